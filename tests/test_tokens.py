"""Token formulas: OpenAI's tiles (with detail) and the Qwen-VL patches, and a request's
estimate."""

import pytest

from beam_caption.core.tokens import default_max_side, estimate_request_tokens, image_tokens


@pytest.mark.parametrize("size, detail, tokens", [
    ((1024, 1024), None, 765),  # OpenAI's worked examples
    ((2048, 4096), "high", 1105),
    ((512, 512), "auto", 255),
    ((100, 4000), None, 85 + 170 * 1 * 4),  # 51x2048: one tile wide, four high
    ((4096, 4096), "low", 85),  # low detail: one fixed price
])
def test_openai_images_follow_the_tile_formula(size, detail, tokens):
    assert image_tokens(*size, "openai", detail) == tokens


@pytest.mark.parametrize("size, tokens", [
    ((1024, 768), 37 * 27 + 2),  # 1036x756 after rounding to 28: 37 x 27 patches
    ((28, 28), 4 + 2),  # raised to the minimum pixels: 56x56
    ((4000, 3000), None),  # capped at 1280 patches
])
def test_qwen_images_count_28_pixel_patches(size, tokens):
    counted = image_tokens(*size, "qwen")
    if tokens is None:
        assert 1200 <= counted - 2 <= 1280
    else:
        assert counted == tokens
    assert image_tokens(*size, "qwen", "low") == counted  # detail is OpenAI's alone


def test_a_request_counts_text_images_and_the_longest_answer():
    assert estimate_request_tokens(400, [(1024, 1024), (512, 512)], 300) == 100 + 765 + 255 + 300
    assert estimate_request_tokens(1, [], None) == 1 + 256  # no --max_tokens: a default answer
    assert estimate_request_tokens(0, [(1024, 1024)], 10, detail="low") == 85 + 10


def test_the_default_image_side_is_what_the_model_sees_at_low_detail():
    from beam_caption.cli.flags import CaptionOptions, prepare_launch

    assert default_max_side("openai", "low") == 512 and image_tokens(512, 384, detail="low") == 85
    assert default_max_side("openai", "high") == default_max_side("qwen", None) == 1024
    for flags, side in ((["--image_detail", "low"], 512), ([], 1024),
                        (["--image_detail", "low", "--max_image_side", "0"], 0)):
        options = CaptionOptions(flags)
        prepare_launch(options)
        assert options.max_image_side == side
