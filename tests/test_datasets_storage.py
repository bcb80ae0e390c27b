"""WebDataset shards and Parquet tables on object storage: the runs of tests/test_datasets.py with
``--input`` on gs:// (gcp-storage-emulator) and s3:// (moto's server), online and through the
Batch API. Each sample ends exactly once, as a caption or a typed failure, keyed ``SHARD#KEY`` /
``FILE#ROW`` with the storage URL, and each shard is streamed from the store: opened there for
reading and read in pieces, never fetched whole or copied to a local file."""

from __future__ import annotations

import collections
import contextlib
import os
import tarfile
import tempfile
from pathlib import Path

import fsspec.spec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, run_cli
from test_datasets import add_member, args, image_bytes, write_shard

from beam_caption.testing import FakeVLMServer

STORES = ["gcs", "s3"]
FILLER_BYTES = 128 << 10  # a binary member of each sample of the large shard


@pytest.fixture(scope="module")
def server():
    with FakeVLMServer() as running:
        yield running


def write_large_shard(path: Path, samples: dict[str, int]) -> dict[str, str]:
    """A shard whose samples also hold a FILLER_BYTES binary member (``KEY.npy``, as DataComp's
    feature members): larger than any read a streaming reader makes. Returns the captions."""
    expected = {}
    with tarfile.open(path, "w") as tar:
        for key, i in samples.items():
            data, expected[key] = image_bytes(i)
            add_member(tar, f"{key}.jpg", data)  # PNG bytes: the image is read by its content
            add_member(tar, f"{key}.npy", b"\x93NUMPY\xff" + os.urandom(FILLER_BYTES))
            add_member(tar, f"{key}.txt", f"alt text of {key}".encode())
    return expected


def write_table(path: Path, first: int, rows: int) -> dict[int, str]:
    """A table of Hugging Face's Image structs holding the bytes (row groups of 2), its last
    row a struct with neither bytes nor path. Returns each good row's caption."""
    records, expected = [], {}
    for row in range(rows):
        data, expected[row] = image_bytes(first + row)
        records.append({"id": row, "image": {"bytes": data, "path": f"orig/{row}.png"}})
    records.append({"id": rows, "image": {"bytes": None, "path": None}})
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    return expected


class Layout:
    """Shards (.tar, .tar.gz, a large one, not a tar, a sample without an image) and a table,
    written locally, uploaded under ``root``: what each element's key must end as."""

    def __init__(self, local: Path, fs, root: str, with_table: bool = True):
        self.root = root
        self.prefix = root.partition("://")[2]
        shards = local / "shards"
        shards.mkdir(parents=True)
        url = f"{root}/shards/"
        self.captions = {f"{url}00000.tar#{key}": caption for key, caption in write_shard(
            shards / "00000.tar", {f"{i:09d}": i for i in range(4)}).items()}
        self.captions.update({f"{url}00001.tar.gz#{key}": caption for key, caption in write_shard(
            shards / "00001.tar.gz", {f"{i:09d}": i for i in range(4, 7)}, "w:gz").items()})
        self.captions.update({f"{url}00004.tar#{key}": caption for key, caption in
                              write_large_shard(shards / "00004.tar",
                                                {f"{i:09d}": i for i in range(7, 10)}).items()})
        (shards / "00002.tar").write_bytes(b"not a tar at all" * 64)
        write_shard(shards / "00003.tar", {"noimage": None})
        self.failures = {f"{url}00002.tar#": "not_a_tar", f"{url}00003.tar#noimage": "wds_no_image"}
        self.sizes = {f"{url}{shard.name}": shard.stat().st_size for shard in shards.iterdir()}
        self.inputs = f"{url}*.tar*"
        if with_table:
            table = f"{root}/table.parquet"
            self.captions.update({f"{table}#{row}": caption for row, caption in write_table(
                local / "table.parquet", 10, 5).items()})
            self.failures[f"{table}#5"] = "no_image_in_struct"
            self.inputs += f",{table}"
        fs.put(f"{local}/", f"{self.prefix}/", recursive=True)


def check_every_sample_once(result, layout: Layout) -> None:
    """Every sample and row is one caption (its own image's) or one typed failure, keyed on the
    store; no key twice; no image bytes in a record."""
    keys = [c["caption_meta"]["key"] for c in result.captions] + [f["key"] for f in
                                                                  result.failures]
    assert len(keys) == len(set(keys)), collections.Counter(keys).most_common(3)
    assert {c["caption_meta"]["key"]: c["caption"] for c in result.captions} == layout.captions
    assert {f["key"]: f["error"]["type"] for f in result.failures} == layout.failures
    for caption in result.captions:
        if "__key__" in caption:  # a sample: joined back by its shard URL and key
            key = caption["caption_meta"]["key"]
            assert key == f"{caption['__url__']}#{caption['__key__']}"
            assert caption["__url__"].startswith(f"{layout.root}/shards/")
            assert caption["txt"] == f"alt text of {caption['__key__']}"
            assert not {"jpg", "png", "npy", "images"} & set(caption)  # no bytes copied
        else:  # a row: the struct's path kept, never its bytes
            assert caption["image"] == f"orig/{caption['id']}.png"
    assert result.summary["captioned"] == len(layout.captions)


class Reads:
    """What fsspec's filesystems are asked to open, per URL: the filesystem, the mode and the
    file given (a remote file class, or a local copy's) of each open, and the size asked of
    each read on those files."""

    def __init__(self, monkeypatch):
        self.opened: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
        self.reads: dict[str, list[int]] = collections.defaultdict(list)
        original_open = fsspec.spec.AbstractFileSystem.open

        def open_(fs, path, mode="rb", *rest, **kwargs):
            handle = original_open(fs, path, mode, *rest, **kwargs)
            url = fs.unstrip_protocol(fs._strip_protocol(path))
            given = ("remote" if isinstance(handle, fsspec.spec.AbstractBufferedFile)
                     else type(handle).__name__)
            self.opened[url].append((type(fs).__name__, mode, given))
            read = handle.read

            def counted_read(size=-1):
                self.reads[url].append(size)
                return read(size)

            with contextlib.suppress(AttributeError):  # a builtin file: a local copy's
                handle.read = counted_read
            return handle

        monkeypatch.setattr(fsspec.spec.AbstractFileSystem, "open", open_)


def check_streamed(reads: Reads, layout: Layout, fs, temp: Path) -> None:
    """Each shard opened on the store's filesystem for reading, as its remote file (never a
    cached or downloaded copy), and read in pieces: a sized read each time, every one smaller
    than the large shard's filler member; nothing left in the temp dir."""
    remote = (type(fs).__name__, "rb", "remote")
    for shard, size in layout.sizes.items():
        assert set(reads.opened[shard]) == {remote}, (shard, reads.opened[shard])
        sizes = reads.reads[shard]
        assert sizes and all(0 < n < FILLER_BYTES for n in sizes), (shard, sizes)
        if shard.endswith("00004.tar"):
            assert size > 3 * FILLER_BYTES and sum(sizes) >= size / 2, (size, sum(sizes))
    assert not list(temp.iterdir())


@pytest.fixture
def temp(tmp_path, monkeypatch) -> Path:
    """An empty directory made the process's temp dir for the test."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.mark.parametrize("store", STORES)
def test_shards_and_a_table_on_storage_are_streamed_each_sample_once(
        store, request, server, tmp_path, temp, monkeypatch):
    scheme, env, fs = request.getfixturevalue(store)
    layout = Layout(tmp_path / "data", fs, f"{scheme}://{BUCKET}/datasets-{tmp_path.name}")
    reads = Reads(monkeypatch)
    before = server.stats()["requests"]
    result = run_cli(args(server, layout.inputs), tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.stats()["requests"] == before + len(layout.captions)
    check_every_sample_once(result, layout)
    check_streamed(reads, layout, fs, temp)


def test_shards_on_storage_through_the_batch_api_each_sample_once(
        gcs, server, tmp_path, temp, monkeypatch):
    scheme, env, fs = gcs
    layout = Layout(tmp_path / "data", fs, f"{scheme}://{BUCKET}/batch-{tmp_path.name}",
                    with_table=False)
    reads = Reads(monkeypatch)
    server.reset_stats()
    result = run_cli(args(server, layout.inputs, "--mode", "batch", "--batch_poll_interval",
                          "0.2", "--batch_max_requests", "4"), tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = server.stats()
    assert stats["requests"] == 0  # every caption came through a batch
    assert stats["events"]["batch"] == stats["events"]["upload"] >= len(layout.captions) / 4
    check_every_sample_once(result, layout)
    assert all(c["caption_meta"]["batch_id"] for c in result.captions)
    check_streamed(reads, layout, fs, temp)


@pytest.mark.parametrize("store", STORES)
def test_webdataset_output_with_images_on_storage_reads_back_and_resumes(
        store, request, server, tmp_path):
    from beam_caption.core.webdataset import iter_samples

    scheme, env, fs = request.getfixturevalue(store)
    layout = Layout(tmp_path / "data", fs, f"{scheme}://{BUCKET}/wdsout-{tmp_path.name}",
                    with_table=False)
    output = f"{layout.root}/out"
    flags = ["--output_format", "webdataset", "--copy_images", "--num_shards", "2"]
    first = run_cli(args(server, layout.inputs, *flags), output, env=env)  # type: ignore[arg-type]
    assert first.returncode == 0, first.stderr[-3000:]

    def written(copy: str) -> dict[str, dict]:
        """The output shards' samples by record key (the shards fetched into ``copy``)."""
        shards = sorted(fs.glob(f"{layout.prefix}/out/captions-*-of-00002.tar"))
        assert len(shards) == 2, shards
        fs.get(shards, f"{tmp_path / copy}/")
        return {sample["record"]["json"]["caption_meta"]["key"]: sample
                for shard in sorted((tmp_path / copy).iterdir())
                for sample in iter_samples(str(shard))}

    samples = written("first")
    assert {key: s["record"]["txt"] for key, s in samples.items()} == layout.captions
    for key, sample in samples.items():  # the image of the input sample, byte for byte
        url, _, sample_key = key.partition("#")
        local = tmp_path / "data" / "shards" / url.rsplit("/", 1)[1]
        [original] = [e for e in iter_samples(str(local)) if e["record"]["__key__"] == sample_key]
        assert sample["images"] == original["images"]
    failures = fs.glob(f"{layout.prefix}/out/failures-*.jsonl")
    assert failures and not fs.glob(f"{layout.prefix}/out/failures-*.tar")

    sent = server.stats()["requests"]
    again = run_cli(args(server, layout.inputs, *flags, "--resume"), output,
                    env=env)  # type: ignore[arg-type]
    assert again.returncode == 0, again.stderr[-3000:]
    assert server.stats()["requests"] == sent  # every caption reused, none asked again
    resumed = written("resumed")
    assert {key: s["images"] for key, s in resumed.items()} == {
        key: s["images"] for key, s in samples.items()}  # reused captions keep their images
