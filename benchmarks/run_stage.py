"""Run only the captioning stage over a manifest and print what it took, as one JSON line.

For measurements that need the stage in a process of its own (e.g. under ``taskset``):

    python benchmarks/run_stage.py --api_url URL --manifest M.jsonl --image_root DIR \
        [--concurrency 32] [CLI flags such as --max_image_side 1024]

prints ``{"seconds": ..., "captioned": ..., "failed": ..., "images_per_s": ...}`` where seconds
run from the first submit to the last result (imports and setup excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Stage, stage_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api_url", required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL, one record a line")
    parser.add_argument("--image_root", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args, flags = parser.parse_known_args()
    lines = args.manifest.read_text().splitlines()
    items = [{"key": f"{args.manifest}#{i}", "source": {"file": str(args.manifest), "index": i},
              "record": json.loads(line)} for i, line in enumerate(lines)]
    stage = Stage(stage_config(args.api_url, args.concurrency, args.image_root, *flags))
    run = stage.run(items)
    print(json.dumps({"seconds": run.seconds, "captioned": run.captioned, "failed": run.failed,
                      "images_per_s": run.per_s}))


if __name__ == "__main__":
    main()
