"""``report`` on jobs that read WebDataset shards and Parquet tables: the contact sheet's
thumbnails are the image bytes read back from the sources (each file once, a shard only as far
as needed, a table only in the row groups needed); a source that cannot be read, or is refused,
is a "no thumbnail" box."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_RUNNER, colour, run_cli
from PIL import Image
from test_datasets import add_member, image_bytes, write_shard

import beam_caption.core.dataset_images as dataset_images
from beam_caption.cli.report import write_report
from beam_caption.testing import FakeVLMServer

IMG = re.compile(r'<figure><img src="data:image/[a-z]+;base64,([^"]+)" alt="">'
                 r'<figcaption><div class="path" title="([^"]*)">')
NO_IMAGE = re.compile(r'<figure><div class="noimage">([^<]*)</div><figcaption><div '
                      r'class="path" title="([^"]*)">')


def thumbnail_colours(page: str) -> dict[str, tuple[int, int, int]]:
    """Each thumbnail's record key -> its centre pixel."""
    colours = {}
    for data, key in IMG.findall(page):
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            rgb = image.convert("RGB")
            colours[key] = rgb.getpixel((rgb.width // 2, rgb.height // 2))
    return colours


def close(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return all(abs(x - y) <= 8 for x, y in zip(a, b, strict=True))  # JPEG thumbnails


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, int, int]]:
    """(file, row group, elements taken) of each source unit the report reads."""
    seen: list[tuple[str, int, int]] = []
    real = dataset_images.iter_unit

    lock = threading.Lock()

    def counted(unit, *args):
        with lock:  # the report reads several files at once, in threads
            index = len(seen)
            seen.append((unit.file, unit.group, 0))
        for element in real(unit, *args):
            with lock:
                file, group, taken = seen[index]
                seen[index] = (file, group, taken + 1)
            yield element

    monkeypatch.setattr(dataset_images, "iter_unit", counted)
    return seen


def test_thumbnails_are_read_back_from_shards_and_tables(tmp_path, reads):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", {f"{i:04d}": i for i in range(6)})
    write_shard(shards / "00001.tar.gz", {f"{i:04d}": i for i in range(6, 9)}, "w:gz")
    rows = [{"id": i, "image": {"bytes": image_bytes(i, "JPEG")[0], "path": f"orig/{i}.jpg"}}
            for i in range(10, 16)]
    rows[4]["image"] = {"bytes": None, "path": "loose.png"}  # a path: read as a manifest's
    (tmp_path / "loose.png").write_bytes(image_bytes(14)[0])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "table.parquet", row_group_size=2)
    with FakeVLMServer() as server:
        result = run_cli([*TEST_RUNNER, "--input", f"{shards}/*.tar*,{tmp_path}/table.parquet",
                          "--api_url", server.url, "--model", "fake-vlm", "--prompt",
                          "Describe.", "--image_root", str(tmp_path)], tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.captions) == 15
    page = Path(write_report(str(tmp_path / "out"), sample=15)).read_text(encoding="utf-8")
    colours = thumbnail_colours(page)
    expected = {**{f"{shards / '00000.tar'}#{i:04d}": i for i in range(6)},
                **{f"{shards / '00001.tar.gz'}#{i:04d}": i for i in range(6, 9)},
                **{f"{tmp_path / 'table.parquet'}#{row}": 10 + row for row in range(6)}}
    assert colours.keys() == expected.keys()
    assert all(close(colours[key], colour(i * 7 + 1)) for key, i in expected.items())
    assert f'">{shards / "00000.tar"}#0003</div>' in page  # a sample's key shown: no path
    # each file read once; the table's three row groups each once (all are wanted)
    assert sorted((file, group) for file, group, _ in reads) == [
        (str(shards / "00000.tar"), 0), (str(shards / "00001.tar.gz"), 0),
        *((str(tmp_path / "table.parquet"), group) for group in range(3))]

    # two records on the sheet: only their shard's samples up to theirs, their row group
    reads.clear()
    page = Path(write_report(str(tmp_path / "out"), sample=2, seed=3)).read_text("utf-8")
    wanted = [key.rpartition("#") for _, key in IMG.findall(page)]
    assert len(wanted) == 2
    assert sorted((file, group) for file, group, _ in reads) == sorted({
        (file, int(place) // 2 if file.endswith(".parquet") else 0)
        for file, _, place in wanted})
    for file, _, taken in reads:  # a shard up to its last sample wanted (keys 6-8: 0-2)
        assert file.endswith(".parquet") or taken == 1 + max(
            int(place) % 6 for wanted_file, _, place in wanted if wanted_file == file)


def hand_written(out: Path, captions: list[dict]) -> str:
    """An output directory of these caption lines, as a job's (or an attacker's) edit."""
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"records": len(captions), "options": {
        "model": "m", "image_key": "image", "image_root": str(out.parent)}}))
    (out / "captions-00000-of-00001.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in captions))
    return str(out)


def test_sources_that_cannot_be_read_or_are_refused_are_no_thumbnail(tmp_path, reads):
    write_shard(tmp_path / "s.tar", {"kept": 1})
    pq.write_table(pa.Table.from_pylist([{"image": b"not an image"}]), tmp_path / "t.parquet")

    def sample(shard: str, key: str) -> dict:
        return {"__key__": key, "__url__": shard, "caption": "<b>x</b>",
                "caption_meta": {"key": f"{shard}#{key}"}}

    captions = [
        sample(str(tmp_path / "s.tar"), "gone"),  # not (or no longer) in its shard
        sample(str(tmp_path / "missing.tar"), "k"),
        sample(str(tmp_path / "s.tar.txt"), "k"),  # not a shard's name: a manifest's record
        sample("http://127.0.0.1:9/s<i>.tar", "k"),  # never fetched, markup escaped
        sample(f"simplecache::{tmp_path / 's.tar'}", "kept"),
        {"image": None, "caption": "y", "caption_meta": {"key": f"{tmp_path / 't.parquet'}#0"}},
        {"caption": "z", "caption_meta": {"key": f"{tmp_path / 'nothing.parquet'}#4"}},
        {"caption": "w", "caption_meta": {"key": f"{tmp_path / 't.parquet'}#7"}},
    ]
    page = Path(write_report(hand_written(tmp_path / "out", captions), sample=10)).read_text(
        encoding="utf-8")
    boxes = {key.rpartition("/")[2]: reason for reason, key in NO_IMAGE.findall(page)}
    assert "not_in_source] the record is no longer in" in boxes["s.tar#gone"]
    assert "source_not_found]" in boxes["missing.tar#k"]
    assert boxes["s.tar.txt#k"] == "no image path in the record"
    assert "source_refused]" in boxes["s&lt;i&gt;.tar#k"] and "<i>" not in page
    assert "source_refused]" in boxes["s.tar#kept"]
    assert boxes["t.parquet#0"].startswith("[image/not_an_image]")
    assert "source_not_found]" in boxes["nothing.parquet#4"]
    assert "not_in_source]" in boxes["t.parquet#7"]
    assert len(boxes) == len(captions) and "<img" not in page
    assert sorted(file.rpartition("/")[2] for file, _, _ in reads) == ["s.tar", "t.parquet"]


def test_a_fifo_named_as_a_shard_is_not_opened(tmp_path):
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    line = {"__key__": "k", "__url__": str(fifo), "caption": "x",
            "caption_meta": {"key": f"{fifo}#k"}}
    page = Path(write_report(hand_written(tmp_path / "out", [line]))).read_text("utf-8")
    assert "source_unreadable]" in page and "is not a regular file" in page


def test_a_shard_is_read_once_and_no_further_than_its_last_wanted_sample(tmp_path, reads):
    shard = tmp_path / "big.tar"
    samples = [(f"{i:05d}", i) for i in range(200)]
    samples.insert(5, ("00003", 500))  # a key met again: the job keyed it SHARD#00003#2
    with tarfile.open(shard, "w") as tar:
        for key, i in samples:
            add_member(tar, f"{key}.png", image_bytes(i)[0])
    lines = [{"__key__": key, "__url__": str(shard), "caption": "x",
              "caption_meta": {"key": f"{shard}#{unique}"}}
             for key, unique in (("00001", "00001"), ("00003", "00003#2"))]
    page = Path(write_report(hand_written(tmp_path / "out", lines))).read_text("utf-8")
    colours = thumbnail_colours(page)
    assert close(colours[f"{shard}#00001"], colour(1 * 7 + 1))
    assert close(colours[f"{shard}#00003#2"], colour(500 * 7 + 1))
    assert reads == [(str(shard), 0, 6)]  # samples 0-5 of 201


def test_a_table_of_paths_is_not_read_its_records_paths_are(tmp_path, reads):
    (tmp_path / "a.png").write_bytes(image_bytes(3)[0])
    pq.write_table(pa.Table.from_pylist([{"image": "a.png"}]), tmp_path / "paths.parquet")
    line = {"image": "a.png", "caption": "x",
            "caption_meta": {"key": f"{tmp_path / 'paths.parquet'}#0"}}
    page = Path(write_report(hand_written(tmp_path / "out", [line]))).read_text("utf-8")
    assert close(thumbnail_colours(page)[f"{tmp_path / 'paths.parquet'}#0"], colour(3 * 7 + 1))
    assert reads == []
