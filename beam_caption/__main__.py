"""``python -m beam_caption``: the command line (beam_caption.cli.main)."""

import sys

from beam_caption.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
