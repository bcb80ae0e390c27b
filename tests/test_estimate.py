"""``estimate``: records, images, tokens and cost from manifests and image headers alone."""

from __future__ import annotations

import pytest
from PIL import Image

from beam_caption.cli.estimate import estimate, parser, report
from beam_caption.cli.main import main
from beam_caption.core.tokens import image_tokens


def _args(data, *flags):
    return parser().parse_args(["--input", ",".join(data.manifests), "--image_root",
                                str(data.root), *flags])


def _sizes(data) -> list[tuple[int, int]]:
    sizes = []
    for record_id in data.expected:
        index = int(record_id[1:])
        suffix = "jpg" if index % 4 == 0 else "png"
        with Image.open(data.root / f"images/img{index:05d}.{suffix}") as image:
            sizes.append(image.size)
    return sizes


@pytest.mark.parametrize("formula, detail", [("openai", None), ("openai", "low"),
                                             ("qwen", None)])
def test_tokens_come_from_headers_without_decoding_a_pixel(dataset_factory, monkeypatch,
                                                           formula, detail):
    data = dataset_factory(9, files=2, bad_records=True)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("a pixel was decoded"))
    flags = ["--token_formula", formula] + (["--image_detail", detail] if detail else [])
    totals = estimate(_args(data, *flags, "--max_tokens", "300"))
    assert totals.records == 11 and totals.images == 10  # the missing image is not counted
    assert totals.unreadable_records == 1
    assert totals.problems == {"image/image_not_found": 1}
    expected = sum(image_tokens(w, h, formula, detail) for w, h in _sizes(data))
    with Image.open(data.root / "images/img09999.png") as rejected:  # only the API refuses it
        rejected_image = image_tokens(*rejected.size, formula, detail)
    assert totals.image_tokens == expected + rejected_image
    assert totals.output_tokens == 10 * 300


def test_images_are_counted_at_the_size_sent(tmp_path):
    Image.new("RGB", (4000, 3000)).save(tmp_path / "big.png")
    (tmp_path / "m.jsonl").write_text(
        '{"image": ["big.png"], "conversation": [{"from": "human", "value": "q"}]}\n')
    args = ["--input", str(tmp_path / "m.jsonl"), "--image_root", str(tmp_path)]
    assert estimate(parser().parse_args(args)).image_tokens == image_tokens(1024, 768)
    unchanged = estimate(parser().parse_args([*args, "--max_image_side", "0"]))
    assert unchanged.image_tokens == image_tokens(4000, 3000)


def test_the_cli_prints_tokens_and_cost(dataset_factory, capsys):
    data = dataset_factory(4, files=1)
    assert main(["estimate", "--input", data.manifests[0], "--image_root", str(data.root),
                 "--model", "gpt-4o-mini", "--image_detail", "low",
                 "--expected_output_tokens", "100", "--price_per_million_input_tokens", "2",
                 "--price_per_million_output_tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("estimate: 4 records, 4 images for gpt-4o-mini")
    totals = estimate(_args(data, "--image_detail", "low", "--expected_output_tokens", "100"))
    assert totals.image_tokens == 4 * 85 and totals.output_tokens == 400
    cost = totals.input_tokens * 2 / 1e6 + 400 * 8 / 1e6
    assert lines[3].startswith(f"  cost: ${totals.input_tokens * 2 / 1e6:,.4f} input + "
                               f"${400 * 8 / 1e6:,.4f} output = ${cost:,.4f}")
    assert lines[4] == (f"  with --mode batch: ${cost / 2:,.4f} (--batch_discount 0.5, saving "
                        f"${cost / 2:,.4f})")


def test_hostile_images_cost_their_record_only(tmp_path, monkeypatch):
    Image.new("RGB", (96, 64)).save(tmp_path / "big.png")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "m.jsonl").write_text("".join(
        f'{{"image": ["{name}"], "conversation": [{{"from": "human", "value": "q"}}]}}\n'
        for name in ("big.png", "text.png", "ok.png")) + "not json\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # big.png: over twice the limit
    totals = estimate(parser().parse_args(["--input", str(tmp_path / "m.jsonl"),
                                           "--image_root", str(tmp_path)]))
    assert (totals.records, totals.images) == (4, 1)
    assert totals.problems == {"image/decompression_bomb": 1, "image/not_an_image": 1,
                               "read/malformed_json": 1}


def test_a_prompts_file_counts_every_image_once_per_prompt(tmp_path):
    Image.new("RGB", (2048, 1536)).save(tmp_path / "big.png")
    (tmp_path / "m.jsonl").write_text('{"image": "big.png", "title": "Dusk", "conversation": '
                                      '[{"from": "human", "value": "Hi"}]}\n')
    (tmp_path / "p.yaml").write_text("a: Describe it.\n"
                                     "b: {prompt: 'Tag {title}', max_tokens: 50}\n")
    args = ["--input", str(tmp_path / "m.jsonl"), "--image_root", str(tmp_path), "--max_tokens",
            "100"]
    one = estimate(parser().parse_args(args))
    two = estimate(parser().parse_args([*args, "--prompts_file", str(tmp_path / "p.yaml")]))
    assert one.image_tokens == image_tokens(1024, 768) and two.image_tokens == 2 * one.image_tokens
    assert (one.output_tokens, two.output_tokens) == (100, 100 + 50)
    assert two.text_tokens > one.text_tokens
    assert (one.cacheable_tokens, two.cacheable_tokens) == (0, one.image_tokens)
    priced = parser().parse_args([*args, "--prompts_file", str(tmp_path / "p.yaml"),
                                  "--price_per_million_input_tokens", "1",
                                  "--price_per_million_cached_input_tokens", "0.25"])
    [line] = [line for line in report(two, priced) if "prefix cache" in line]
    full = two.input_tokens / 1e6
    assert f"down to ${full - one.image_tokens * 0.75 / 1e6:,.4f} " in line
    assert not [line for line in report(two, parser().parse_args(args)) if "prefix" in line]
