"""Reading and writing WebDataset tar shards: one element per sample, its image bytes with it
(no Beam here).

A shard is a tar file (``.tar``; or gzip, bzip2 or xz compressed, found by its first bytes)
read as a stream: never extracted to disk, never held whole, each member's data read once or
skipped. Members are grouped into samples as WebDataset does: a member's key is its path up to
the first '.' of its last path component, the rest is its extension (lowercased); consecutive
members sharing a key make one sample, and a key met again later (or an extension met twice
in a row) starts another sample. Directories, links and names without an extension are not
members of any sample.

Each sample becomes one element::

    {"key": "SHARD#KEY", "source": {"file": SHARD, "sample": KEY, "index": I},
     "record": {"__key__": KEY, "__url__": SHARD, "json": {...}, "txt": "...", ...},
     "images": [IMAGE_BYTES]}

where ``I`` counts the shard's samples from 0 and ``SHARD`` is the shard's name without URL
credentials or query (``redact_url``). The record holds the ``.json`` member parsed (strict
JSON like a manifest line, except that NaN and Infinity, which Python's ``json.dumps`` writes,
become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``) and every other member of at
most ``MAX_TEXT_BYTES`` that is UTF-8 text, as a string under its extension; binary members
are not copied. The image is the member of the extension asked for, else the first of
``IMAGE_EXTENSIONS`` in that order; its bytes travel in ``images``, never in the record. Keys
are unique within a shard: a sample whose key an earlier sample of the shard already has gets
``#2`` (``#3``...) appended in the element's key (its record's ``__key__`` and
``source.sample`` keep the key as written, and ``source.index`` tells them apart).

A sample that cannot be read becomes one failure element (``records.failure_element``, stage
``read``, the record as far as it was read, never the bytes) and reading goes on:

- ``wds_no_image``: no member of the image extension;
- ``wds_member_too_large``: the image member is over ``max_member_bytes``, or the ``.json``
  over ``manifest_reader.MAX_RECORD_SIZE`` (their data is skipped, not held);
- ``wds_bad_json``: the ``.json`` member is not strict JSON in UTF-8 (or too deep);
- ``wds_corrupt_member``: a member header is corrupt; reading resumes at the next valid header,
  and the samples on both sides of the damage fail (either may have lost the member);
- ``wds_truncated``: the shard ends inside the sample, or without the end-of-archive blocks
  after it, or cannot be read on (a storage or decompression error); the rest of the shard is
  unread.

A file that is not a tar at all is one failure ``not_a_tar`` keyed ``SHARD#`` (source
``{"file": SHARD}``), as is ``wds_unreadable`` for a shard that cannot be opened or read before
its first member.

Memory: the current sample's record and one image (plus one candidate while the preferred
extension may still come), tarfile's read buffer, and the keys met in the shard (for unique
keys: about 100 bytes a sample).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Literal

import fsspec

from beam_caption.core.errors import CaptionError, encodable
from beam_caption.core.manifest_reader import JSON_DECODER, MAX_RECORD_SIZE, value_problem
from beam_caption.core.records import failure_element
from beam_caption.core.redact import redact_url, scrub

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the image when none is named, in this order
MAX_MEMBER_BYTES = 64 << 20
MAX_TEXT_BYTES = 1 << 20  # larger members other than the image and .json are not copied
RESERVED_FIELDS = ("__key__", "__url__")  # members of these extensions are not copied
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz
KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's own split
_FORMAT_ERRORS = (tarfile.TarError, EOFError, zlib.error)
# A manifest's strict JSON, but NaN and Infinity (which Python's json.dumps writes, and so
# img2dataset's metadata may hold) are kept as the strings "NaN", "Infinity", "-Infinity".
_JSON_MEMBER = json.JSONDecoder(parse_constant=str, parse_float=JSON_DECODER.parse_float)


class _NotATar(Exception):
    """The file's first header is not a tar header."""


class _Truncated(Exception):
    """The shard ends before its end-of-archive blocks."""


@dataclasses.dataclass
class _Headers:
    """What tarfile's header reads met since the last member: tarfile, reading with
    ``ignore_zeros`` (which skips a corrupt header to the next valid one), ends alike at the
    end marker, at a corrupt header with nothing valid after it and at a cut; this tells them
    apart."""

    at_end: bool = False  # end-of-archive (zero) blocks came after the last member
    damaged_at: int | None = None  # offset of a corrupt header after the last member


def _header_probe(headers: _Headers) -> type[tarfile.TarInfo]:
    """A TarInfo class that notes in ``headers`` why the headers tarfile reads are not members,
    and refuses a file whose first header is none."""

    class Probe(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            try:
                member = super().fromtarfile(tar)
            except tarfile.EOFHeaderError:
                headers.at_end = True
                raise
            except (tarfile.InvalidHeaderError, tarfile.EmptyHeaderError,
                    tarfile.TruncatedHeaderError) as exc:
                if tar.offset == 0:
                    raise _NotATar(str(exc)) from None
                if (isinstance(exc, tarfile.InvalidHeaderError) and not headers.at_end
                        and headers.damaged_at is None):  # junk after the end marker: no member
                    headers.damaged_at = tar.offset
                raise
            headers.at_end = False
            return member

    return Probe


def _open_tar(handle, headers: _Headers, seekable: bool) -> tarfile.TarFile:
    """The tar in ``handle``, read by seeking over member data when ``seekable`` and
    uncompressed, else as a stream; _NotATar when it is none."""
    magic = handle.read(6) if seekable else b""
    if seekable:
        handle.seek(0)
    compressed = magic.startswith(_COMPRESSED_MAGIC)
    mode: Literal["r:", "r|*"] = "r:" if seekable and not compressed else "r|*"
    try:
        # tarfile's default buffer: its stream copies what is left of a buffer at each read
        return tarfile.open(fileobj=handle, mode=mode, ignore_zeros=True,
                            tarinfo=_header_probe(headers))
    except _FORMAT_ERRORS as exc:  # not a compressed stream, or corrupt from its start
        raise _NotATar(str(exc)) from None


@dataclasses.dataclass
class _Member:
    """A sample member as it comes: its key and extension, whether it starts a sample, and the
    offset of a corrupt header met just before it (None when none)."""

    info: tarfile.TarInfo
    key: str
    extension: str
    starts_sample: bool
    damaged_at: int | None


def _members(tar: tarfile.TarFile, headers: _Headers) -> Iterator[_Member]:
    """The shard's sample members in order; _Truncated when the shard ends without its
    end-of-archive blocks (or with a corrupt header and nothing valid after it)."""
    key: str | None = None
    extensions: set[str] = set()
    while (info := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header it read
        match = KEY_AND_EXTENSION.match(encodable(info.name)) if info.isreg() else None
        if match is None:
            continue
        damaged_at, headers.damaged_at = headers.damaged_at, None
        member_key, extension = match.group(1), match.group(2).lower()
        starts = member_key != key or extension in extensions
        if starts:
            key, extensions = member_key, set()
        extensions.add(extension)
        yield _Member(info, member_key, extension, starts, damaged_at)
    if headers.damaged_at is not None:
        raise _Truncated(f"a corrupt tar header at offset {headers.damaged_at} and no valid "
                         "member after it")
    if not headers.at_end:
        raise _Truncated(f"the shard ends at offset {tar.offset} without its end-of-archive "
                         "blocks")


class UniqueKeys:
    """The keys given in one shard: ``unique`` appends ``SEP2``, ``SEP3``... to a key given
    already (about 100 bytes a key)."""

    def __init__(self, separator: str) -> None:
        self._separator = separator
        self._next: dict[str, int] = {}  # each key given -> the next suffix to try after it

    def unique(self, key: str) -> str:
        if key not in self._next:
            self._next[key] = 2
            return key
        suffix = self._next[key]
        while (candidate := f"{key}{self._separator}{suffix}") in self._next:
            suffix += 1
        self._next[key] = suffix + 1
        self._next[candidate] = 2
        return candidate


@dataclasses.dataclass
class _Sample:
    """A sample being read: its record so far, its best image yet, its first problem."""

    key: str
    index: int
    record: dict
    image: bytes | None = None
    image_rank: int = len(IMAGE_EXTENSIONS)  # the held image's place in the wanted extensions
    error: CaptionError | None = None

    def fail(self, error: CaptionError) -> None:
        """Keep ``error`` unless the sample failed already; drop its image."""
        self.error = self.error or error
        self.image = None


class _SampleReader:
    """Turns a shard's members into sample elements, one sample at a time."""

    def __init__(self, shard: str, wanted: tuple[str, ...], max_member_bytes: int):
        self.shard = shard
        self.wanted = wanted
        self.max_member_bytes = max_member_bytes
        self.sample: _Sample | None = None  # the sample being read
        self._count = 0
        self._keys = UniqueKeys("#")

    def where(self, sample: _Sample) -> str:
        return f"sample {sample.key!r} (#{sample.index}) of {self.shard}"

    def fail(self, error: CaptionError) -> None:
        """Fail the sample being read, if any, with ``error`` (unless it failed already)."""
        if self.sample is not None:
            self.sample.fail(error)

    def start(self, key: str) -> dict | None:
        """Start the next sample; the element of the one it ends, if any."""
        done = self.finish()
        self.sample = _Sample(key, self._count, {"__key__": key, "__url__": self.shard})
        self._count += 1
        return done

    def finish(self) -> dict | None:
        """The element of the sample being read (None when there is none); ends it."""
        sample, self.sample = self.sample, None
        if sample is None:
            return None
        key = f"{self.shard}#{self._keys.unique(sample.key)}"
        source = {"file": self.shard, "sample": sample.key, "index": sample.index}
        if sample.error is None and sample.image is None:
            sample.error = CaptionError("read", "wds_no_image", f"{self.where(sample)} has no "
                                        f"{'/'.join('.' + ext for ext in self.wanted)} member")
        if sample.error is not None:
            return failure_element(key, source, sample.error, record=sample.record)
        return {"key": key, "source": source, "record": sample.record, "images": [sample.image]}

    def add(self, tar: tarfile.TarFile, member: _Member) -> None:
        """Read one member into the sample being read, or leave its data to be skipped."""
        sample = self.sample
        assert sample is not None
        ext = member.extension
        if ext in self.wanted:  # a failed sample's text is still read: its failure shows it
            rank = self.wanted.index(ext)
            if (sample.error is None and rank < sample.image_rank
                    and self._within(sample, member, self.max_member_bytes)):
                sample.image, sample.image_rank = self._data(tar, member), rank
        elif ext == "json":
            if self._within(sample, member, min(MAX_RECORD_SIZE, self.max_member_bytes)):
                self._add_json(sample, member, self._data(tar, member))
        elif member.info.size <= MAX_TEXT_BYTES and ext not in RESERVED_FIELDS:
            with contextlib.suppress(UnicodeDecodeError):  # binary: not copied
                sample.record[ext] = self._data(tar, member).decode("utf-8")

    def _within(self, sample: _Sample, member: _Member, limit: int) -> bool:
        """Whether the member is at most ``limit`` bytes; else the sample fails."""
        if member.info.size <= limit:
            return True
        sample.fail(CaptionError("read", "wds_member_too_large", (
            f"{self.where(sample)}: member {member.info.name!r} is {member.info.size} bytes, "
            f"over the limit of {limit}")))
        return False

    def _add_json(self, sample: _Sample, member: _Member, data: bytes) -> None:
        try:
            value = _JSON_MEMBER.decode(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 and 1e400 included
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        else:
            problem = value_problem(value)
            if problem is None:
                sample.record["json"] = value
                return
            reason = problem[1]
        sample.fail(CaptionError("read", "wds_bad_json", (
            f"{self.where(sample)}: member {member.info.name!r} is not valid JSON: {reason}")))

    @staticmethod
    def _data(tar: tarfile.TarFile, member: _Member) -> bytes:
        return member_data(tar, member.info)


def iter_samples(shard: str, image_ext: str | None = None, *,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Stream one shard's elements: a sample with its image bytes, or a sample's failure.

    Args:
        shard: a local path or any fsspec URL of a tar shard (compressed or not).
        image_ext: the image member's extension (``jpg``; case and a leading '.' are ignored);
            None takes the first of ``IMAGE_EXTENSIONS`` the sample has.
        max_member_bytes: image members over this many bytes fail their sample unread.

    Yields:
        One element per sample, in shard order (see the module docstring for the shapes and
        the failure types); one failure keyed ``SHARD#`` for a file that is not a tar or
        cannot be opened.
    """
    url, name = shard, redact_url(shard)
    reader = _SampleReader(name, _wanted_extensions(image_ext), max_member_bytes)
    headers = _Headers()
    try:
        with fsspec.open(url, "rb") as handle, _open_tar(handle, headers, False) as tar:
            for member in _members(tar, headers):
                damage = None if member.damaged_at is None else _damage(name, member.damaged_at)
                if damage:  # the sample before the damage may have lost its last members...
                    reader.fail(damage)
                if member.starts_sample:
                    if (done := reader.start(member.key)) is not None:
                        yield done
                    if damage:  # ...and the one after it its first members
                        reader.fail(damage)
                reader.add(tar, member)
    except _NotATar as exc:
        yield _shard_failure(name, "not_a_tar", f"{name} is not a tar file ({exc})")
        return
    except (OSError, _Truncated, *_FORMAT_ERRORS) as exc:  # storage errors included
        reason = " ".join(scrub(str(exc).replace(url, name)).split()) or type(exc).__name__
        if reader.sample is None:
            yield _shard_failure(name, "wds_unreadable", f"{name} could not be read: {reason}")
            return
        reader.fail(CaptionError("read", "wds_truncated", (
            f"{reader.where(reader.sample)}: the shard is truncated or unreadable here "
            f"({reason}); the rest of the shard is unread")))
    if (done := reader.finish()) is not None:
        yield done


def _wanted_extensions(image_ext: str | None) -> tuple[str, ...]:
    return (image_ext.lower().lstrip("."),) if image_ext else IMAGE_EXTENSIONS


def _damage(shard: str, offset: int) -> CaptionError:
    return CaptionError("read", "wds_corrupt_member", (
        f"a corrupt tar header at offset {offset} of {shard}: a member of this sample or of the "
        "sample next to it is lost"))


def _shard_failure(shard: str, type_: str, message: str) -> dict:
    return failure_element(f"{shard}#", {"file": shard}, CaptionError("read", type_, message),
                           raw="")


def count_samples(shard: str) -> int:
    """How many elements ``iter_samples`` yields for ``shard``, from the tar headers only.

    An uncompressed shard on a seekable file is read by seeking over member data; a
    compressed one is decompressed as a stream, holding nothing. Storage errors (OSError)
    propagate: the caller decides what a progress total is worth without them.
    """
    headers = _Headers()
    count = 0
    with fsspec.open(shard, "rb") as handle:
        try:
            with _open_tar(handle, headers, handle.seekable()) as tar:
                for member in _members(tar, headers):
                    count += member.starts_sample
        except _NotATar:
            return 1
        except (_Truncated, *_FORMAT_ERRORS):
            return max(count, 1)  # the samples read, or the shard's one failure
    return count


def member_data(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """The data of a regular file member of a tar being read."""
    data = tar.extractfile(info)
    assert data is not None  # a regular file
    return data.read()


def write_sample(tar: tarfile.TarFile, key: str, members: Mapping[str, bytes]) -> None:
    """Add one sample to a tar being written (any mode, ``w|`` for a stream): a ``KEY.EXT``
    member per item of ``members``, in their order.

    TarInfo's defaults are kept (mtime 0, uid/gid 0, no user or group name, mode 0o644), so
    the same samples always make the same bytes.

    Raises:
        ValueError: when ``key`` has a '.' in its last path component, or an extension is
            empty or holds a '/': the shard would not read back as this sample.
    """
    if not key or key.endswith("/") or "." in key.rpartition("/")[2]:
        raise ValueError(f"a WebDataset key cannot be empty or hold a '.' in its last path "
                         f"component: {key!r}")
    for extension, data in members.items():
        if not extension or "/" in extension:
            raise ValueError(f"bad member extension {extension!r} for sample {key!r}")
        info = tarfile.TarInfo(f"{key}.{extension}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
