"""What a request costs in tokens, counted before it is sent: its text, its images as sent and
the longest answer it allows. Used by the job-wide rate limits and by ``estimate``.

Two image formulas, by model family (``--token_formula``):

- ``openai``: OpenAI's for GPT-4o-class models. ``detail`` low is 85 tokens whatever the size;
  high (and auto, counted as high) fits the image in 2048x2048, then its shortest side in 768,
  and counts 170 per 512-pixel tile plus 85 (1024x1024: 765).
- ``qwen``: Qwen-VL-style (Qwen2-VL, Qwen2.5-VL and others served by vLLM/SGLang): the image
  is resized to multiples of 28 pixels within 3,136 and 1,003,520 pixels, one token per 28x28
  patch (1024x768: 1,008), plus 2 for its start and end markers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

FORMULAS = ("openai", "qwen")
DEFAULT_MAX_SIDE = 1024  # --max_image_side when not given (low detail: LOW_DETAIL_SIDE)
LOW_DETAIL_SIDE = 512  # OpenAI shrinks a low-detail image to 512x512 itself
DETAILS = ("low", "high", "auto")
DEFAULT_COMPLETION_TOKENS = 256  # counted for the answer when --max_tokens is not set
CHARS_PER_TOKEN = 4  # text tokens are estimated from characters
LOW_DETAIL_TOKENS = 85
QWEN_PATCH_PX = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 1280 * 28 * 28


def openai_image_tokens(width: int, height: int, detail: str | None = None) -> int:
    """Tokens of an image in OpenAI's formula (see the module)."""
    if detail == "low" or width <= 0 or height <= 0:
        return LOW_DETAIL_TOKENS
    fit = min(1.0, 2048 / max(width, height))
    fit *= min(1.0, 768 / (min(width, height) * fit))
    return 85 + 170 * math.ceil(width * fit / 512) * math.ceil(height * fit / 512)


def qwen_image_tokens(width: int, height: int) -> int:
    """Tokens of an image in the Qwen-VL formula (see the module)."""
    patch = QWEN_PATCH_PX
    w = max(patch, round(width / patch) * patch)
    h = max(patch, round(height / patch) * patch)
    if w * h > QWEN_MAX_PIXELS:
        scale = math.sqrt(width * height / QWEN_MAX_PIXELS)
        w = max(patch, math.floor(width / scale / patch) * patch)
        h = max(patch, math.floor(height / scale / patch) * patch)
    elif w * h < QWEN_MIN_PIXELS:
        scale = math.sqrt(QWEN_MIN_PIXELS / (width * height))
        w = math.ceil(width * scale / patch) * patch
        h = math.ceil(height * scale / patch) * patch
    return w * h // (patch * patch) + 2


def image_tokens(width: int, height: int, formula: str = "openai",
                 detail: str | None = None) -> int:
    """Tokens of an image of this size as sent, in ``formula``."""
    if formula == "qwen":
        return qwen_image_tokens(width, height)
    return openai_image_tokens(width, height, detail)


def text_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimate_request_tokens(text_chars: int, image_sizes: Iterable[tuple[int, int]],
                            max_tokens: int | None, formula: str = "openai",
                            detail: str | None = None) -> int:
    """Tokens a request counts against a tokens-per-minute limit before it is answered: its
    text, its images as sent and the longest answer it allows."""
    images = sum(image_tokens(width, height, formula, detail) for width, height in image_sizes)
    return text_tokens(text_chars) + images + (max_tokens or DEFAULT_COMPLETION_TOKENS)


def default_max_side(formula: str, detail: str | None) -> int:
    """--max_image_side when not given: 512 for OpenAI's low detail (the model sees no more: the
    same 85 tokens, a quarter of the bytes), else 1024 (benchmarks/bench_image_tokens.py shows
    what each side costs per formula)."""
    return LOW_DETAIL_SIDE if formula == "openai" and detail == "low" else DEFAULT_MAX_SIDE
