"""Tokens an image costs as sent at each --max_image_side, per token formula (no server needed).

Prints, for common photo sizes, the tokens of the image unresized (what the server would bill
after its own resizing) and at each cap, and the ratio to unresized: where a cap costs the same
as unresized it loses nothing the model would have seen; where it costs less it saves tokens
at a lower resolution.
"""

from __future__ import annotations

from beam_caption.cli.estimate import _sent_size
from beam_caption.core.tokens import image_tokens

SIZES = ((4000, 3000), (3000, 4000), (1920, 1080), (1024, 1024), (4000, 2000), (800, 600))
CAPS = (512, 768, 1024, 1536, 2048)


def main() -> None:
    for formula, detail in (("openai", "high"), ("openai", "low"), ("qwen", None)):
        print(f"{formula}{f' detail={detail}' if detail else ''}: tokens unresized -> at "
              f"--max_image_side {', '.join(map(str, CAPS))} (ratio to unresized)")
        for size in SIZES:
            full = image_tokens(*size, formula, detail)
            capped = [image_tokens(*_sent_size(size, cap), formula, detail) for cap in CAPS]
            cells = ", ".join(f"{t} ({t / full:.2f})" for t in capped)
            print(f"  {size[0]}x{size[1]}: {full} -> {cells}")


if __name__ == "__main__":
    main()
