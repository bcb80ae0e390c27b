"""``--output_format webdataset`` (captions as tar shards of KEY.json, KEY.txt and, with
``--copy_images``, the image), its resume, and Parquet's ``__key__``/``__url__`` columns (the
CLI in-process, the library in a TestPipeline)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from conftest import read_jsonl, run_cli
from PIL import Image
from test_datasets import add_member, args, image_bytes

import beam_caption as bc
from beam_caption.cli.report import write_report
from beam_caption.core.caption_shards import (
    image_extension,
    sample_key,
    sample_members,
    shard_keys,
    write_caption,
)
from beam_caption.core.errors import UsageError
from beam_caption.core.outputs import Unread, parquet_schema, read_output_records
from beam_caption.core.records import IMAGE_BYTES
from beam_caption.core.webdataset import iter_samples
from beam_caption.testing import FakeVLMServer
from beam_caption.transforms.skip_done import _split


@pytest.fixture(scope="module")
def server():
    with FakeVLMServer() as running:
        yield running


def write_shard(path: Path, samples: dict[str, int]) -> dict[str, tuple[bytes, str]]:
    """A shard of samples KEY.png + KEY.json; each key's (image bytes, expected caption)."""
    expected = {}
    with tarfile.open(path, "w") as tar:
        for key, i in samples.items():
            expected[key] = image_bytes(i)
            add_member(tar, f"{key}.png", expected[key][0])
            add_member(tar, f"{key}.json", json.dumps({"n": i}).encode())
    return expected


def read_samples(out: Path, prefix: str = "captions") -> dict[str, dict]:
    """Every sample of the output tar shards, as core/webdataset reads them: key -> (the
    caption line, its .txt, its image bytes or None, its member extensions in order)."""
    samples = {}
    for shard in sorted(out.glob(f"{prefix}-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        for element in iter_samples(str(shard)):
            record = element.get("record") or {}
            key = record["__key__"]
            samples[key] = {"line": record.get("json"), "txt": record.get("txt"),
                            "image": (element.get("images") or [None])[0],
                            "members": [n.split(".", 1)[1] for n in names
                                        if n.split(".", 1)[0] == key]}
    return samples


def test_shards_become_webdataset_shards_with_their_images_and_resume_keeps_them(
        server, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    first = write_shard(shards / "a.tar", {"000000000": 0, "odd.name/x-1": 1, "000000002": 2})
    second = write_shard(shards / "b.tar", {"000000000": 3})  # the key of a's first sample
    (shards / "c.tar").write_bytes(b"not a tar" * 100)
    out = tmp_path / "out"
    flags = ["--output_format", "webdataset", "--copy_images", "--num_shards", "1"]
    before = server.stats()["requests"]
    result = run_cli(args(server, str(shards / "*.tar"), *flags), out)
    assert result.returncode == 0, result.stderr
    assert f"{out}/captions-*.tar, {out}/failures-*.jsonl" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "captions-00000-of-00001.tar", "failures-00000-of-00001.jsonl", "summary.json"]
    samples = read_samples(out)
    # '.' and '/' cannot be in a key; a key met again in the shard gets _2
    assert sorted(samples) == ["000000000", "000000000_2", "000000002", "odd_name_x-1"]
    by_input = {line["__key__"] + line["__url__"][-5:]: sample
                for sample in samples.values() for line in [sample["line"]]}
    for (key, shard), (data, caption) in [((k, "a.tar"), v) for k, v in first.items()] + [
            ((k, "b.tar"), v) for k, v in second.items()]:
        sample = by_input[key + shard]
        assert sample["members"] == ["json", "txt", "png"]  # in this order
        assert sample["image"] == data  # the input's bytes, unchanged
        assert sample["txt"] == caption == sample["line"]["caption"]
        assert IMAGE_BYTES not in sample["line"] and "images" not in sample["line"]
    # KEY.json is exactly the line jsonl would hold: what the readers of outputs read back
    assert sorted(c["caption_meta"]["key"] for c in read_output_records(str(out), "captions")) \
        == sorted(s["line"]["caption_meta"]["key"] for s in samples.values())
    [failure] = result.failures
    assert failure["error"]["type"] == "not_a_tar" and IMAGE_BYTES not in failure
    assert result.summary["captioned"] == 4
    page = Path(write_report(str(out))).read_text()
    assert all(caption in page for _, caption in first.values())

    # --resume onto the tar shards: nothing asked again, every image kept
    asked = server.stats()["requests"]
    assert asked == before + 4
    rerun = run_cli(args(server, str(shards / "*.tar"), *flags, "--resume"), out)
    assert rerun.returncode == 0, rerun.stderr
    assert server.stats()["requests"] == asked and rerun.summary["resumed"] == 4
    assert {k: (s["image"], s["txt"]) for k, s in read_samples(out).items()} \
        == {k: (s["image"], s["txt"]) for k, s in samples.items()}
    assert not list((out / ".checkpoint").glob("*"))  # the moved shards were cleared


def test_manifest_records_with_copy_images_are_read_once_and_resumed_from_the_tar(
        server, tmp_path, dataset_factory):
    data = dataset_factory(4, files=1)  # images img00000.jpg, then .png
    out = tmp_path / "out"
    flags = ["--image_root", str(data.root), "--output_format", "webdataset", "--copy_images",
             "--num_shards", "2"]
    result = run_cli(args(server, data.manifests[0], *flags), out)
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    assert len(samples) == 4 and len(list(out.glob("captions-*-of-00002.tar"))) == 2
    for key, sample in samples.items():
        line = sample["line"]
        record_key = line["caption_meta"]["key"]  # no __key__: a digest of the record key
        assert key == hashlib.sha256(record_key.encode()).hexdigest()[:16]
        path = line["image"][0]
        assert sample["image"] == (data.root / path).read_bytes()
        assert sample["members"] == ["json", "txt", path.rsplit(".", 1)[1]]
        assert sample["txt"] == data.expected[line["id"]]

    asked = server.stats()["requests"]
    for image in (data.root / "images").iterdir():  # resumed images come from the tar
        image.unlink()
    rerun = run_cli(args(server, data.manifests[0], *flags, "--resume"), out)
    assert rerun.returncode == 0, rerun.stderr
    assert server.stats()["requests"] == asked and rerun.summary["resumed"] == 4
    assert {k: s["image"] for k, s in read_samples(out).items()} \
        == {k: s["image"] for k, s in samples.items()}


def test_captions_resumed_from_json_lines_get_their_images_from_the_record(
        server, tmp_path, dataset_factory):
    """Reused captions without image members (earlier jsonl shards, checkpoint parts): a
    sample's bytes come with its record, a manifest record's image is read again."""
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = write_shard(shards / "a.tar", {"s1": 1})
    data = dataset_factory(2, files=1)
    inputs = f"{shards / 'a.tar'},{data.manifests[0]}"
    out = tmp_path / "out"
    assert run_cli(args(server, inputs, "--image_root", str(data.root)), out).returncode == 0
    asked = server.stats()["requests"]
    rerun = run_cli(args(server, inputs, "--image_root", str(data.root), "--output_format",
                         "webdataset", "--copy_images", "--resume"), out)
    assert rerun.returncode == 0, rerun.stderr
    assert server.stats()["requests"] == asked and rerun.summary["resumed"] == 3
    images = {k: s["image"] for k, s in read_samples(out).items()}
    assert images.pop("s1") == expected["s1"][0]
    assert sorted(images.values()) == sorted(
        (data.root / f"images/img0000{i}.{'jpg' if i == 0 else 'png'}").read_bytes()
        for i in range(2))


def test_a_damaged_caption_shard_is_kept_aside_and_its_records_captioned_again(
        server, tmp_path, dataset_factory):
    data = dataset_factory(4, files=1)
    out = tmp_path / "out"
    flags = ["--image_root", str(data.root), "--output_format", "webdataset", "--num_shards",
             "1"]
    assert run_cli(args(server, data.manifests[0], *flags), out).returncode == 0
    [shard] = out.glob("captions-*.tar")
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 3])  # cut inside a sample's member
    unread = Unread()
    kept = list(read_output_records(str(out), "captions", unread))
    assert 0 < len(kept) < 4 and list(unread.damaged) == [str(shard)]
    asked = server.stats()["requests"]
    rerun = run_cli(args(server, data.manifests[0], *flags, "--resume"), out)
    assert rerun.returncode == 0, rerun.stderr
    assert server.stats()["requests"] == asked + 4 - len(kept)
    assert rerun.summary["resumed"] == len(kept) and rerun.summary["captioned"] == 4
    assert len(list((out / "damaged").glob("*captions-00000-of-00001.tar"))) == 1
    assert {s["line"]["id"] for s in read_samples(out).values()} == set(data.expected)


def test_a_tar_shard_cut_at_a_member_boundary_is_damaged_not_whole(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as tar:
        keys = shard_keys()
        for i in range(3):
            line = {"id": i, "caption": f"c{i}", "caption_meta": {"key": f"m#{i}"}}
            write_caption(tar, keys, line, json.dumps(line), ["caption"], False)
    whole = buffer.getvalue()
    end = whole.rindex(b"c2") + 512  # past the last member's data block: no end blocks
    shard = tmp_path / "captions-00000-of-00001.tar"
    shard.write_bytes(whole[:end - end % 512])
    unread = Unread()
    assert [r["id"] for r in read_output_records(str(tmp_path), "captions", unread)] == [0, 1, 2]
    assert "without its end-of-archive blocks" in unread.damaged[str(shard)]
    shard.write_bytes(whole)
    unread = Unread()
    assert len(list(read_output_records(str(tmp_path), "captions", unread))) == 3
    assert unread == Unread()


def test_sample_keys_and_image_extensions():
    assert sample_key({"__key__": "a.b/c d"}) == "a_b_c_d"
    assert sample_key({"__key__": 7}) == "7"
    digest = hashlib.sha256(b"f.jsonl#3").hexdigest()[:16]
    assert sample_key({"__key__": "", "caption_meta": {"key": "f.jsonl#3"}}) == digest
    assert sample_key({"__key__": "x" * 129, "caption_meta": {"key": "f.jsonl#3"}}) == digest
    keys = shard_keys()
    assert [keys.unique(k) for k in ("a", "a", "a_2", "a")] == ["a", "a_2", "a_2_2", "a_3"]
    for fmt, extension in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"),
                           ("BMP", "bmp"), ("TIFF", "tiff")):
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, fmt)
        assert image_extension(buffer.getvalue()) == extension, fmt
    assert image_extension(b"RIFF\0\0\0\0WAVE") == "bin"
    # .txt: the first output key's answer as text (JSON text when structured), else none
    line = {"tags": {"a": 1}, "caption": "c", IMAGE_BYTES: [b"\x89PNG\r\n\x1a\n.."]}
    assert sample_members(line, "{}", ["tags", "caption"], True) == {
        "json": b"{}", "txt": b'{"a": 1}', "png": line[IMAGE_BYTES][0]}
    assert sample_members({**line, IMAGE_BYTES: "not bytes"}, "{}", ["other"], True) \
        == {"json": b"{}"}


def test_a_reused_caption_takes_its_record_s_image_bytes_when_it_has_none():
    caption = {"id": 1, "caption": "c", "caption_meta": {"key": "s.tar#k"}}
    record = {"key": "s.tar#k", "source": {}, "record": {"id": 1}, "images": [b"\xff\xd8\xff"]}
    grouped = ("fp", {"done": [caption], "records": [record]})
    [kept] = _split(grouped, "todo", "set_aside", keep_images=True)
    assert kept[IMAGE_BYTES] == [b"\xff\xd8\xff"]
    [plain] = _split(grouped, "todo", "set_aside")
    assert IMAGE_BYTES not in plain


def test_parquet_output_has_typed_key_and_url_columns(server, tmp_path, dataset_factory):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a.tar", {"000000001": 1})
    data = dataset_factory(1, files=1)
    out = tmp_path / "out"
    result = run_cli(args(server, f"{shards / 'a.tar'},{data.manifests[0]}", "--image_root",
                          str(data.root), "--output_format", "parquet", "--num_shards", "1"),
                     out)
    assert result.returncode == 0, result.stderr
    [path] = out.glob("captions-*.parquet")
    table = pq.read_table(path)
    assert table.schema.equals(parquet_schema())
    rows = {row["key"]: (row["__key__"], row["__url__"]) for row in table.to_pylist()}
    assert rows == {f"{shards / 'a.tar'}#000000001": ("000000001", str(shards / "a.tar")),
                    f"{data.manifests[0]}#0": (None, None)}


@pytest.mark.parametrize("flags, message", [
    (["--copy_images"], "--copy_images writes the images into WebDataset shards: add "
                        "--output_format webdataset"),
    (["--output_format", "webdataset", "--output_compression", "gzip"],
     "--output_compression is for jsonl and json"),
    (["--output_format", "webdataset", "--copy_images", "--mode", "batch"],
     "--copy_images carries the image bytes the online requests read: not with --mode batch"),
], ids=["copy_images without webdataset", "gzip tar", "batch"])
def test_output_flags_that_cannot_work_are_refused_at_launch(tmp_path, flags, message):
    result = run_cli(["--input", "in.jsonl", "--api_url", "http://127.0.0.1:9/v1", "--model",
                      "m", *flags], tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_library_writes_webdataset_shards_with_images(server, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = write_shard(shards / "a.tar", {f"k{i}": i for i in range(3)})
    config = bc.CaptionConfig(api_url=server.url, model="fake-vlm", prompt="Describe it.")
    out = tmp_path / "out"
    with TestPipeline(runner="FnApiRunner") as p:
        results = (p | bc.ReadManifests(str(shards / "a.tar"))
                   | bc.CaptionRecords(config, copy_images=True))
        _ = results | bc.WriteCaptions(str(out), config, output_format="webdataset",
                                       copy_images=True)
        _ = results.captions | beam.Map(lambda c: c[IMAGE_BYTES])  # they carry the bytes
    samples = read_samples(out)
    assert {k: (s["image"], s["txt"]) for k, s in samples.items()} == expected
    assert read_jsonl(str(out / "failures-*.jsonl")) == []
    with pytest.raises(UsageError, match="--copy_images writes the images"):
        bc.WriteCaptions(str(out), config, copy_images=True)
    with pytest.raises(UsageError, match="not with a captioner"):
        bc.CaptionRecords(config, copy_images=True, captioner=beam.Map(lambda r: r))
