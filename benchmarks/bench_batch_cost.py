"""The same 10,000-record job online and through the Batch API, priced by ``estimate``.

Builds a manifest of 10,000 records over photos of common sizes (4000x3000, 3000x4000,
1920x1080, 1024x1024, 800x600; headers only are read), then runs ``python -m beam_caption
estimate`` at gpt-4o's list prices ($2.50 / $10.00 per million input / output tokens; the
openai token formula is its tile formula) at the default image side and with --image_detail
low, and prints online and batch cost and their ratio. Nothing is sent anywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

from PIL import Image

from beam_caption.cli.estimate import estimate, parser, report

RECORDS = 10_000
SIZES = ((4000, 3000), (3000, 4000), (1920, 1080), (1024, 1024), (800, 600))
PRICES = ["--price_per_million_input_tokens", "2.50", "--price_per_million_output_tokens",
          "10.00"]


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for i, size in enumerate(SIZES):
            Image.new("RGB", size, (i * 40, 90, 160)).save(root / f"photo{i}.jpg")
        manifest = root / "manifest.jsonl"
        manifest.write_text("".join(json.dumps({
            "image": f"photo{i % len(SIZES)}.jpg",
            "conversation": [{"from": "human", "value": "Describe the image in detail."}]})
            + "\n" for i in range(RECORDS)))
        for extra in ([], ["--image_detail", "low"]):
            args = parser().parse_args(["--input", str(manifest), "--image_root", str(root),
                                        "--model", "gpt-4o", "--max_tokens", "300",
                                        *PRICES, *extra])
            totals = estimate(args)
            with contextlib.redirect_stdout(io.StringIO()):
                lines = report(totals, args)
            print("\n".join(lines))
            online = sum(totals.cost(2.50, 10.00))
            print(f"  -> online ${online:,.2f}, batch ${online * args.batch_discount:,.2f} "
                  f"(ratio {args.batch_discount:.2f})\n")


if __name__ == "__main__":
    main()
