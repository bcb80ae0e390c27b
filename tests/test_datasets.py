"""WebDataset shards and Parquet tables as ``--input``: each sample or row captioned from the
image bytes it carries (or the path it names), keyed ``SHARD#KEY`` / ``FILE#ROW``, resumed by
fingerprint, bad input a typed failure or one line at launch (the CLI in-process)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SIZES, TEST_RUNNER, colour, run_cli
from PIL import Image

from beam_caption.core.inputs import SAMPLE_PROMPT
from beam_caption.testing import FakeVLMServer
from beam_caption.testing.fake_vlm import caption_for_images


@pytest.fixture(scope="module")
def server():
    with FakeVLMServer() as running:
        yield running


def image_bytes(i: int, fmt: str = "PNG") -> tuple[bytes, str]:
    """Image i's encoded bytes and the fake server's caption of it."""
    image = Image.new("RGB", SIZES[i % 3], colour(i * 7 + 1))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue(), caption_for_images([image])


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: dict[str, int | None], mode: str = "w") -> dict[str, str]:
    """A shard of img2dataset's layout (KEY.png, KEY.json, KEY.txt); image None: no image
    member. Returns each key's expected caption."""
    expected = {}
    with tarfile.open(path, mode) as tar:
        for key, i in samples.items():
            if i is not None:
                data, expected[key] = image_bytes(i)
                add_member(tar, f"{key}.png", data)
            add_member(tar, f"{key}.json", json.dumps({"key": key, "width": 8}).encode())
            add_member(tar, f"{key}.txt", f"alt text of {key}".encode())
    return expected


def args(server, inputs: str, *extra: str) -> list[str]:
    return [*TEST_RUNNER, "--input", inputs, "--api_url", server.url, "--model", "fake-vlm",
            "--prompt", "Describe the image.", "--max_concurrency", "4", *extra]


def test_webdataset_shards_are_captioned_from_their_members_and_resumed(server, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    first = write_shard(shards / "00000.tar", {f"{i:09d}": i for i in range(4)})
    second = write_shard(shards / "00001.tar.gz", {f"{i:09d}": i for i in range(4, 7)}, "w:gz")
    (shards / "00002.tar").write_bytes(b"not a tar at all" * 64)
    write_shard(shards / "00003.tar", {"noimage": None})
    expected = {**first, **second}
    before = server.stats()["requests"]
    result = run_cli(args(server, str(shards / "*.tar*")), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert server.stats()["requests"] == before + 7
    captions = {c["__key__"]: c for c in result.captions}
    assert {key: c["caption"] for key, c in captions.items()} == expected
    sample = captions["000000005"]
    assert sample["__url__"] == str(shards / "00001.tar.gz")
    assert sample["json"] == {"key": "000000005", "width": 8}
    assert sample["txt"] == "alt text of 000000005"
    assert sample["caption_meta"]["key"] == f"{shards / '00001.tar.gz'}#000000005"
    assert "png" not in sample and "images" not in sample  # bytes never in an output
    failures = {f["key"]: f["error"]["type"] for f in result.failures}
    assert failures == {f"{shards / '00002.tar'}#": "not_a_tar",
                        f"{shards / '00003.tar'}#noimage": "wds_no_image"}
    assert result.summary["captioned"] == 7

    # the same shards again: nothing asked; one image replaced under its key: only it
    rerun = run_cli(args(server, str(shards / "*.tar*"), "--resume"), tmp_path / "out")
    assert rerun.returncode == 0, rerun.stderr
    assert server.stats()["requests"] == before + 7
    replaced = write_shard(shards / "00000.tar", {"000000000": 9, **{
        f"{i:09d}": i for i in range(1, 4)}})
    rerun = run_cli(args(server, str(shards / "*.tar*"), "--resume"), tmp_path / "out")
    assert rerun.returncode == 0, rerun.stderr
    assert server.stats()["requests"] == before + 8  # the fingerprint covers the bytes
    captions = {c["__key__"]: c["caption"] for c in rerun.captions}
    assert captions["000000000"] == replaced["000000000"] != expected["000000000"]


def test_shards_without_a_prompt_are_asked_the_sample_prompt(server, tmp_path):
    expected = write_shard(tmp_path / "00000.tar", {"a": 1, "b": 2})
    argv = [a for a in args(server, str(tmp_path / "*.tar")) if a not in (
        "--prompt", "Describe the image.")]
    result = run_cli(argv, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert {c["__key__"]: c["caption"] for c in result.captions} == expected
    assert result.summary["options"]["prompt"] == SAMPLE_PROMPT


def test_parquet_rows_with_image_bytes_structs_and_paths(server, tmp_path):
    (tmp_path / "images").mkdir()
    rows, expected = [], {}
    for i in range(5):
        data, caption = image_bytes(i)
        if i == 3:  # a path, resolved like a manifest's
            (tmp_path / "images" / "three.png").write_bytes(data)
            rows.append({"id": i, "image": {"bytes": None, "path": "images/three.png"}})
        else:  # Hugging Face's Image feature: the bytes win over the path
            rows.append({"id": i, "image": {"bytes": data, "path": f"orig/{i}.png"}})
        expected[i] = caption
    rows.append({"id": 5, "image": {"bytes": None, "path": None}})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "table.parquet", row_group_size=2)
    before = server.stats()["requests"]
    result = run_cli(args(server, str(tmp_path / "table.parquet"), "--image_root",
                          str(tmp_path)), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert server.stats()["requests"] == before + 5
    assert {c["id"]: c["caption"] for c in result.captions} == expected
    row = next(c for c in result.captions if c["id"] == 1)
    assert row["image"] == "orig/1.png"  # the struct's path; never its bytes
    assert row["caption_meta"]["key"] == f"{tmp_path / 'table.parquet'}#1"
    [failure] = result.failures
    assert (failure["key"], failure["error"]["type"]) == (
        f"{tmp_path / 'table.parquet'}#5", "no_image_in_struct")


def test_a_table_without_the_image_column_is_refused_at_launch(server, tmp_path):
    pq.write_table(pa.Table.from_pylist([{"id": 1, "url": "a.png"}]), tmp_path / "t.parquet")
    result = run_cli(args(server, str(tmp_path / "t.parquet")), tmp_path / "out")
    assert result.returncode == 2
    assert "--image_key image: " in result.stderr and "has no such column (columns: id, url)" \
        in result.stderr
    assert not (tmp_path / "out" / "summary.json").exists()
