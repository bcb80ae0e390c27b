"""WebDataset shards (core/webdataset.py): samples with their image bytes, each bad input a
typed failure of the samples it concerns, streamed without holding a shard."""

import contextlib
import io
import json
import os
import tarfile
import tracemalloc

import fsspec
import pytest
from PIL import Image

from beam_caption.core import webdataset
from beam_caption.core.webdataset import count_samples, iter_samples, write_sample


def jpeg(i: int, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (i * 40 % 256, 90, 200)).save(out, fmt)
    return out.getvalue()


def img2dataset_sample(i: int) -> tuple[str, dict[str, bytes]]:
    """A sample as img2dataset writes it: KEY.jpg, KEY.json (its metadata), KEY.txt (caption)."""
    meta = {"url": f"https://example.com/{i}.jpg", "key": f"{i:09d}", "status": "success"}
    return f"{i:09d}", {"jpg": jpeg(i), "json": json.dumps(meta).encode(),
                        "txt": f"a photo {i}".encode()}


def write_shard(path, samples, mode: str = "w") -> str:
    with tarfile.open(str(path), mode) as tar:
        for key, members in samples:
            write_sample(tar, key, members)
    return str(path)


def write_members(path, members: list[tuple[str, bytes]]) -> str:
    """A tar of the given member names and data, in order (any layout, duplicates too)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def header_offsets(path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        return {member.name: member.offset for member in tar.getmembers()}


def errors(elements) -> list:
    return [element["error"]["type"] if "error" in element else None for element in elements]


def test_img2dataset_shard_gives_each_sample_with_its_image(tmp_path):
    shard = write_shard(tmp_path / "00000.tar", [img2dataset_sample(i) for i in (1, 2, 3)])
    elements = list(iter_samples(shard))
    assert elements[0] == {
        "key": f"{shard}#000000001",
        "source": {"file": shard, "sample": "000000001", "index": 0},
        "record": {"__key__": "000000001", "__url__": shard,
                   "json": {"url": "https://example.com/1.jpg", "key": "000000001",
                            "status": "success"},
                   "txt": "a photo 1"},
        "images": [jpeg(1)]}
    assert [e["key"] for e in elements] == [f"{shard}#00000000{i}" for i in (1, 2, 3)]
    assert [e["images"] for e in elements] == [[jpeg(i)] for i in (1, 2, 3)]
    assert count_samples(shard) == 3


def test_the_image_is_the_named_extension_else_the_first_of_jpg_jpeg_png_webp(tmp_path):
    shard = write_members(tmp_path / "s.tar", [
        ("a.png", jpeg(1, "PNG")), ("a.JPG", jpeg(2)), ("a.cls", b"7"),
        ("a.npy", b"\x93NUMPY\x00\xff\xfe"), ("a.seg.png", jpeg(3, "PNG")),
        ("b.webp", jpeg(4, "WEBP"))])
    default = list(iter_samples(shard))
    assert [e["images"] for e in default] == [[jpeg(2)], [jpeg(4, "WEBP")]]  # jpg over png
    assert default[0]["record"] == {"__key__": "a", "__url__": shard, "cls": "7"}  # no binary
    assert next(iter_samples(shard, ".PNG"))["images"] == [jpeg(1, "PNG")]
    named = list(iter_samples(shard, "seg.png"))
    assert named[0]["images"] == [jpeg(3, "PNG")]
    assert errors(named) == [None, "wds_no_image"]


def test_directories_links_and_names_without_extension_belong_to_no_sample(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        tar.addfile(tarfile.TarInfo("dir"))  # defaults to a regular file: make it a directory
        tar.members[-1].type = tarfile.DIRTYPE
        for name, data in (("dir/x.jpg", jpeg(1)), ("README", b"hello"), ("dir/.hidden", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("dir/y.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "x.jpg"
        tar.addfile(link)
    elements = list(iter_samples(str(path)))
    assert [(e["record"]["__key__"], errors([e])[0]) for e in elements] == [
        ("dir/x", None), ("dir/", "wds_no_image")]  # WebDataset's split: 'dir/' + '.hidden'
    assert count_samples(str(path)) == 2


def test_a_gzipped_shard_reads_like_the_tar(tmp_path):
    samples = [img2dataset_sample(i) for i in range(4)]
    plain = list(iter_samples(write_shard(tmp_path / "s.tar", samples)))
    for name, mode in (("s.tar.gz", "w:gz"), ("s.tgz", "w|gz"), ("s.tar.xz", "w:xz")):
        shard = write_shard(tmp_path / name, samples, mode)
        elements = list(iter_samples(shard))
        assert [(e["record"]["json"], e["images"]) for e in elements] == [
            (e["record"]["json"], e["images"]) for e in plain]
        assert elements[0]["key"] == f"{shard}#000000000"
        assert count_samples(shard) == 4


def test_a_key_met_again_later_is_another_sample_with_a_unique_key(tmp_path):
    shard = write_members(tmp_path / "s.tar", [
        ("a.jpg", jpeg(1)), ("b.jpg", jpeg(2)), ("a.jpg", jpeg(3)), ("a.txt", b"third"),
        ("a.jpg", jpeg(4)),  # same extension again: a new sample, as WebDataset groups them
        ("a#2.jpg", jpeg(5))])  # a key that looks like a suffixed one
    elements = list(iter_samples(shard))
    assert [e["key"].removeprefix(shard) for e in elements] == [
        "#a", "#b", "#a#2", "#a#3", "#a#2#2"]
    assert [e["record"]["__key__"] for e in elements] == ["a", "b", "a", "a", "a#2"]
    assert [e["source"]["index"] for e in elements] == [0, 1, 2, 3, 4]
    assert [e["images"] for e in elements] == [[jpeg(i)] for i in range(1, 6)]
    assert elements[2]["record"]["txt"] == "third"
    assert count_samples(shard) == 5


@pytest.mark.parametrize("content", [b"just some text, not a tar file\n" * 40, b""])
def test_a_file_that_is_not_a_tar_is_one_failure(tmp_path, content):
    path = tmp_path / "s.tar"
    path.write_bytes(content)
    [failure] = iter_samples(str(path))
    assert failure["key"] == f"{path}#"
    assert failure["source"] == {"file": str(path)}
    assert failure["error"]["stage"] == "read"
    assert failure["error"]["type"] == "not_a_tar"
    assert str(path) in failure["error"]["message"]
    assert count_samples(str(path)) == 1


def test_a_missing_shard_is_one_failure(tmp_path):
    [failure] = iter_samples(str(tmp_path / "gone.tar"))
    assert (failure["key"], failure["error"]["type"]) == (f"{tmp_path}/gone.tar#",
                                                          "wds_unreadable")


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_a_shard_cut_inside_a_member_costs_that_sample_and_the_rest(tmp_path, mode):
    samples = [img2dataset_sample(i) for i in range(5)]
    for _, members in samples:
        members["bin"] = os.urandom(3000)  # incompressible: half the .gz holds two samples
    whole = write_shard(tmp_path / "whole", samples, mode)
    offsets = header_offsets(whole)
    cut = tmp_path / ("cut.tar.gz" if mode == "w:gz" else "cut.tar")
    data = open(whole, "rb").read()
    if mode == "w":
        cut.write_bytes(data[:offsets["000000002.jpg"] + 700])  # inside sample 2's image
    else:
        cut.write_bytes(data[:len(data) // 2])
    elements = list(iter_samples(str(cut)))
    last = len(elements) - 1
    assert errors(elements) == [None] * last + ["wds_truncated"]
    assert last >= 1 and [e["images"] for e in elements[:last]] == [
        [jpeg(i)] for i in range(last)]
    failure = elements[-1]
    assert failure["key"] == f"{cut}#{last:09d}"
    assert "images" not in failure and "the rest of the shard is unread" in (
        failure["error"]["message"])
    assert count_samples(str(cut)) == len(elements)


def test_a_shard_cut_between_members_fails_its_last_sample(tmp_path):
    whole = write_shard(tmp_path / "whole.tar", [img2dataset_sample(i) for i in range(3)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(whole, "rb").read()[:header_offsets(whole)["000000001.txt"]])
    elements = list(iter_samples(str(cut)))
    assert errors(elements) == [None, "wds_truncated"]  # sample 1 lacks its end: not trusted
    assert elements[1]["record"]["json"]["key"] == "000000001"
    assert count_samples(str(cut)) == 2


def test_a_corrupt_header_costs_the_samples_beside_it(tmp_path):
    whole = write_shard(tmp_path / "whole.tar", [img2dataset_sample(i) for i in range(5)])
    data = bytearray(open(whole, "rb").read())
    at = header_offsets(whole)["000000002.jpg"]
    data[at:at + 100] = b"\x00garbage" * 12 + b"\x00" * 4  # its name and checksum
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(data)
    elements = list(iter_samples(str(damaged)))
    assert errors(elements) == [None, "wds_corrupt_member", "wds_corrupt_member", None, None]
    assert [e["record"]["__key__"] for e in elements] == [f"{i:09d}" for i in range(5)]
    assert f"offset {at}" in elements[2]["error"]["message"]
    assert elements[2]["record"]["txt"] == "a photo 2"  # what could be read is shown
    assert count_samples(str(damaged)) == 5


def test_bad_json_no_image_and_a_member_too_large_fail_their_sample_only(tmp_path):
    shard = write_members(tmp_path / "s.tar", [
        ("0.jpg", jpeg(0)), ("0.json", b'{"a": 1'), ("0.txt", b"zero"),
        ("1.json", b'{"ok": true}'), ("1.txt", b"no image"),
        ("2.jpg", os.urandom(5000)), ("2.json", b"{}"),
        ("3.json", b'{"x": 1e400}'), ("3.jpg", jpeg(3)),
        ("4.json", b"\xff{}"), ("4.jpg", jpeg(4)),
        ("5.jpg", jpeg(5)), ("5.json", b'{"fine": [1, 2], "p": NaN, "q": -Infinity}')])
    elements = list(iter_samples(shard, max_member_bytes=4000))
    assert errors(elements) == ["wds_bad_json", "wds_no_image", "wds_member_too_large",
                                "wds_bad_json", "wds_bad_json", None]
    assert elements[0]["record"] == {"__key__": "0", "__url__": shard, "txt": "zero"}
    assert elements[1]["record"]["json"] == {"ok": True}
    assert elements[2]["error"]["message"].endswith("is 5000 bytes, over the limit of 4000")
    assert all("images" not in e and e["error"]["stage"] == "read" for e in elements[:5])
    assert elements[5]["record"]["json"] == {"fine": [1, 2], "p": "NaN", "q": "-Infinity"}
    for failure in elements[:5]:  # strict JSON, no bytes anywhere
        json.dumps(failure, allow_nan=False)


class _CountingFile(io.RawIOBase):
    """A read-only file that counts what is read through it."""

    def __init__(self, handle):
        self._handle = handle
        self.total = self.largest = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        return self._handle.seek(offset, whence)

    def tell(self):
        return self._handle.tell()

    def read(self, size=-1):
        data = self._handle.read(size)
        self.total += len(data)
        self.largest = max(self.largest, len(data))
        return data


def test_a_shard_is_read_once_as_a_stream_and_never_held(tmp_path, monkeypatch):
    mib = 1 << 20
    images = [os.urandom(2 * mib) for _ in range(3)]
    samples = [(f"{i:03d}", {"jpg": images[i % 3], "txt": b"t"}) for i in range(16)]
    shard = write_shard(tmp_path / "big.tar", samples)  # 32 MiB
    opened = []
    real_open = fsspec.open

    @contextlib.contextmanager
    def counting_open(url, mode="rb", **kwargs):
        with real_open(url, mode, **kwargs) as handle:
            opened.append(_CountingFile(handle))
            yield opened[-1]

    monkeypatch.setattr(webdataset.fsspec, "open", counting_open)
    # images read (tarfile's stream copies one image twice on the way), then all skipped
    for limit, peak_bound in ((4 * mib, 8 * mib), (mib, mib // 2)):
        opened.clear()
        tracemalloc.start()
        try:
            count = 0
            for element in iter_samples(shard, max_member_bytes=limit):
                count += 1
                assert ("images" in element) == (limit > 2 * mib)
                del element
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count == 16
        assert peak < peak_bound, (limit, peak)  # one image at a time, not the 32 MiB shard
        assert opened[0].total == os.path.getsize(shard)  # each byte read once
        assert opened[0].largest <= 64 << 10  # in small reads, never the shard at once
    opened.clear()
    assert count_samples(shard) == 16
    assert opened[0].total < 64 << 10  # the headers only: member data is seeked over


def test_memory_stays_flat_as_a_shard_grows(tmp_path):
    peaks = []
    for count in (1000, 4000):
        shard = write_shard(tmp_path / f"{count}.tar",
                            [(f"{i:09d}", {"jpg": b"x" * 10}) for i in range(count)])
        tracemalloc.start()
        try:
            assert sum(1 for _ in iter_samples(shard)) == count
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # only the keys met are kept (~60 bytes a sample); a header kept per member is ~500
    assert peaks[1] - peaks[0] < 800_000, peaks


def test_a_shard_on_any_fsspec_storage(tmp_path):
    samples = [img2dataset_sample(i) for i in range(3)]
    with fsspec.open("memory://bucket/shards/00000.tar", "wb") as out:
        with tarfile.open(fileobj=out, mode="w|") as tar:
            for key, members in samples:
                write_sample(tar, key, members)
    elements = list(iter_samples("memory://bucket/shards/00000.tar", "jpg"))
    assert [e["key"] for e in elements] == [
        f"memory://bucket/shards/00000.tar#{i:09d}" for i in range(3)]
    assert elements[1]["record"]["__url__"] == "memory://bucket/shards/00000.tar"
    assert count_samples("memory://bucket/shards/00000.tar") == 3


def test_written_samples_are_byte_identical_and_read_back(tmp_path):
    samples = [(f"{i:05d}", {"json": json.dumps({"caption": f"c{i}"}).encode(),
                             "txt": f"c{i}".encode(), "jpg": jpeg(i)}) for i in range(3)]

    def shard_bytes() -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w|") as tar:
            for key, members in samples:
                write_sample(tar, key, members)
        return out.getvalue()

    first = shard_bytes()
    assert shard_bytes() == first
    (tmp_path / "out.tar").write_bytes(first)
    elements = list(iter_samples(str(tmp_path / "out.tar")))
    assert [(e["record"]["json"], e["record"]["txt"], e["images"]) for e in elements] == [
        ({"caption": f"c{i}"}, f"c{i}", [jpeg(i)]) for i in range(3)]
    with tarfile.open(tmp_path / "out.tar") as tar:
        member = tar.getmember("00000.jpg")
        assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (
            0, 0, 0, "", 0o644)


@pytest.mark.parametrize("key, ext", [("a.b", "jpg"), ("", "jpg"), ("dir/", "jpg"),
                                      ("k", ""), ("k", "x/y")])
def test_write_sample_refuses_what_would_not_read_back(key, ext):
    with tarfile.open(fileobj=io.BytesIO(), mode="w|") as tar, pytest.raises(ValueError):
        write_sample(tar, key, {ext: b"x"})
