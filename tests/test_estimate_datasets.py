"""``estimate`` on WebDataset shards and Parquet tables: tokens from the headers of the image
bytes they carry (no pixel decoded), their read failures counted as not counted."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_main
from PIL import Image
from test_datasets import add_member

from beam_caption.cli.estimate import estimate, parser
from beam_caption.core.tokens import image_tokens


def encoded(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, fmt)
    return buffer.getvalue()


def write_shard(path: Path, samples: dict[str, tuple[str, bytes] | None],
                mode: str = "w") -> None:
    """A shard of samples KEY -> (image extension, bytes), None: no image member."""
    with tarfile.open(path, mode) as tar:
        for key, image in samples.items():
            if image is not None:
                add_member(tar, f"{key}.{image[0]}", image[1])
            add_member(tar, f"{key}.txt", f"alt text of {key}".encode())


@pytest.fixture
def inputs(tmp_path) -> tuple[str, list[tuple[int, int]]]:
    """Shards and a table of every layout, and the sizes of the images the job would send."""
    write_shard(tmp_path / "00000.tar", {"a": ("png", encoded((96, 64))),
                                         "b": ("jpg", encoded((2048, 1536), "JPEG")),
                                         "c": None})  # wds_no_image
    write_shard(tmp_path / "00001.tar.gz", {"d": ("webp", encoded((80, 80), "WEBP"))}, "w:gz")
    (tmp_path / "00002.tar").write_bytes(b"not a tar at all" * 64)  # not_a_tar
    write_shard(tmp_path / "00003.tar", {"bad": ("jpg", b"no JPEG here")})  # not_an_image
    (tmp_path / "on_disk.png").write_bytes(encoded((96, 64)))
    pq.write_table(pa.Table.from_pylist([
        {"image": {"bytes": encoded((64, 96)), "path": "orig/0.png"}},  # Hugging Face's Image
        {"image": {"bytes": None, "path": "on_disk.png"}},  # a path: read from --image_root
        {"image": {"bytes": None, "path": None}},  # no_image_in_struct
    ]), tmp_path / "structs.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist([{"image": [encoded((80, 80)), encoded((30, 20))]}]),
                   tmp_path / "lists.parquet")
    sent = [(96, 64), (1024, 768), (80, 80), (64, 96), (96, 64), (80, 80), (30, 20)]
    return str(tmp_path), sent


def test_shards_and_tables_are_counted_from_their_image_headers(inputs, monkeypatch):
    root, sent = inputs
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("a pixel was decoded"))
    totals = estimate(parser().parse_args([
        "--input", f"{root}/*.tar*,{root}/*.parquet", "--image_root", root,
        "--prompt", "Describe.", "--max_tokens", "100"]))
    assert totals.records == 10  # 3 + 1 + 1 + 1 samples, 3 + 1 rows
    assert totals.problems == {"read/wds_no_image": 1, "read/not_a_tar": 1,
                               "image/not_an_image": 1, "read/no_image_in_struct": 1}
    assert totals.unreadable_records == 4
    assert totals.images == len(sent) == 7
    assert totals.image_tokens == sum(image_tokens(w, h) for w, h in sent)
    assert totals.output_tokens == 6 * 100


def test_the_cli_counts_shards_and_refuses_a_table_without_the_image_column(inputs, tmp_path):
    root, sent = inputs
    status, out, err = run_main(["estimate", "--input", f"{root}/0000[01].tar*", "--prompt",
                                 "Describe.", "--token_formula", "qwen"])
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("estimate: 4 records, 3 images (token formula qwen")
    assert lines[-1] == "  not counted: 1 records that would fail (read/wds_no_image: 1)"
    # shards alone without --prompt: counted with the sample prompt the job would ask
    status, without_prompt, err = run_main(["estimate", "--input", f"{root}/0000[01].tar*",
                                            "--token_formula", "qwen"])
    assert status == 0, err
    assert without_prompt.splitlines()[-1] == lines[-1] and "no_prompt" not in without_prompt
    pq.write_table(pa.Table.from_pylist([{"url": "a.png"}]), tmp_path / "urls.parquet")
    status, out, err = run_main(["estimate", "--input", str(tmp_path / "urls.parquet")])
    assert status == 2 and not out
    assert err.count("\n") == 1 and "--image_key image: " in err and "has no such column" in err
