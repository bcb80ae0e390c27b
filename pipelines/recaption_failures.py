"""Caption again the records an earlier run could not: its failures file as the new input.

Reads ``--from_output``'s failures (any output format), keeps the records whose failure may
succeed another time (``retryable``: timeouts, 429s, 5xx, schema misses...; ``--all`` keeps
every failure that holds its record), writes them as ``--output/retried_records.jsonl`` and
captions that manifest into ``--output`` as a normal job would. Lines that could not be read
as records (``raw``) cannot be retried and are counted as left. Run from the repository root:

    python pipelines/recaption_failures.py --from_output out/ --output out_retry/ \\
        --api_url http://127.0.0.1:8011/v1 --model fake-vlm

Give the first run's --image_root (relative image paths are resolved against it).
"""

import json
import sys

import fsspec

from beam_caption.cli.recipe import Recipe, input_from_earlier_output
from beam_caption.core.errors import UsageError
from beam_caption.core.outputs import FAILURES_PREFIX, read_output_records

RETRY_MANIFEST = "retried_records.jsonl"


def add_flags(parser):
    parser.add_argument("--from_output", help="Output directory of the earlier run (required).")
    parser.add_argument("--all", action="store_true", default=False,
                        help="Retry every failure that holds its record, not only the "
                             "retryable ones.")


def write_retry_manifest(from_output: str, output_dir: str, every: bool) -> tuple[str, int, int]:
    """The manifest of the records to retry, how many it holds, and how many were left."""
    path = f"{output_dir.rstrip('/')}/{RETRY_MANIFEST}"
    kept = left = 0
    with fsspec.open(path, "wt", encoding="utf-8", auto_mkdir=True) as manifest:
        for failure in read_output_records(from_output, FAILURES_PREFIX):
            if "record" in failure and (every or failure["error"]["retryable"]):
                manifest.write(json.dumps(failure["record"], ensure_ascii=False) + "\n")
                kept += 1
            else:
                left += 1
    return path, kept, left


def adopt(recipe_flags, options):
    if not recipe_flags.from_output:
        raise UsageError("missing required flag: --from_output")
    input_from_earlier_output(options, recipe_flags.from_output, RETRY_MANIFEST, "failures")


def prepare(recipe_flags, options):
    _, kept, left = write_retry_manifest(recipe_flags.from_output, options.output,
                                         recipe_flags.all)
    print(f"retrying {kept} records from {recipe_flags.from_output}; {left} failures left as "
          "they are (not retryable, or not a record)")


main = Recipe("recaption_failures.py", __doc__.split("\n\n")[0], add_flags=add_flags,
              adopt=adopt, prepare=prepare).main

if __name__ == "__main__":
    sys.exit(main())
