"""Captions as WebDataset tar shards (``--output_format webdataset``): a caption line as one
sample, and the samples of such a shard read back (no Beam here).

A caption becomes the sample ``KEY`` with, in this order:

- ``KEY.json``: the output line, exactly what a jsonl file would hold (UTF-8 JSON, no newline);
- ``KEY.txt``: the answer under the first output key as text (a structured answer as JSON
  text); left out for a line without that answer (a set-aside caption made with other
  settings);
- with ``--copy_images``, each image the caption carries (``records.carried_images``):
  ``KEY.EXT`` for the first, ``KEY.1.EXT``, ``KEY.2.EXT``... for the next ones, ``EXT`` named
  from the bytes' magic numbers (``image_extension``: jpg, png, webp, gif, bmp, tiff; ``bin``
  for anything else), no pixel decoded.

``KEY`` is the record's ``__key__`` (a WebDataset sample's), every character but ASCII letters,
digits, '_' and '-' replaced by '_' (a '.' would split the key, a '/' make a folder); a record
without one, or whose key is empty or over MAX_KEY_CHARS, is keyed by ``key_digest`` of its
record key (``caption_meta.key``). Keys are unique within a shard (``shard_keys``): a key met
again gets ``_2``, ``_3``... appended.

``caption_samples`` streams a shard back: each sample's ``.json`` text and, when asked, its
images in order. Reading is as tolerant as the other formats' (core/outputs.py): a ``.json``
member that is not UTF-8 or over the size limit, or a sample without one, is a None text; a
damaged shard raises (tarfile.TarError, EOFError, OSError) after the samples before the damage,
and a shard cut at a member boundary is found by its missing end-of-archive blocks.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from beam_caption.core.records import carried_images, without_image_bytes
from beam_caption.core.webdataset import (
    KEY_AND_EXTENSION,
    MAX_MEMBER_BYTES,
    UniqueKeys,
    member_data,
    write_sample,
)

MAX_KEY_CHARS = 128
_NOT_IN_KEY = re.compile(r"[^A-Za-z0-9_-]")
# (signature offset, signature, extension): formats the caption step accepts (images.py)
_MAGIC = ((0, b"\xff\xd8\xff", "jpg"), (0, b"\x89PNG\r\n\x1a\n", "png"), (8, b"WEBP", "webp"),
          (0, b"GIF87a", "gif"), (0, b"GIF89a", "gif"), (0, b"BM", "bmp"),
          (0, b"II*\x00", "tiff"), (0, b"MM\x00*", "tiff"))
_IMAGE_MEMBER = re.compile(r"(?:(\d+)[.])?([a-z]+)")  # EXT or N.EXT
_IMAGE_EXTENSIONS = frozenset(extension for *_, extension in _MAGIC) | {"bin"}


def image_extension(data: bytes) -> str:
    """The file extension of an encoded image, from its first bytes (``bin``: unknown)."""
    for offset, magic, extension in _MAGIC:
        if data.startswith(magic, offset) and (extension != "webp" or data.startswith(b"RIFF")):
            return extension
    return "bin"


def key_digest(record_key: str) -> str:
    """A short stable sample key for a record key: 16 hex digits of its SHA-256."""
    return hashlib.sha256(record_key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def sample_key(line: dict) -> str:
    """The sample key of a caption line, before ``shard_keys`` makes it unique."""
    given = line.get("__key__")
    if isinstance(given, str | int) and not isinstance(given, bool):
        key = _NOT_IN_KEY.sub("_", str(given))
        if 0 < len(key) <= MAX_KEY_CHARS:
            return key
    meta = line.get("caption_meta")
    record_key = meta.get("key") if isinstance(meta, dict) else None
    return key_digest(record_key if isinstance(record_key, str)
                      else json.dumps(without_image_bytes(line), sort_keys=True, default=str))


def shard_keys() -> UniqueKeys:
    """The sample keys of one output shard: a key given already gets ``_2``, ``_3``..."""
    return UniqueKeys("_")


def sample_members(line: dict, json_line: str, output_keys: list[str],
                   copy_images: bool) -> dict[str, bytes]:
    """The members of a caption line's sample, extension -> data, in their order (see the
    module): ``json_line`` is the line as jsonl holds it."""
    members = {"json": json_line.encode("utf-8")}
    answer = line.get(output_keys[0]) if output_keys else None
    if answer is not None:
        text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
        members["txt"] = text.encode("utf-8", "surrogatepass")
    for number, data in enumerate(carried_images(line) if copy_images else ()):
        extension = image_extension(data)
        members[f"{number}.{extension}" if number else extension] = data
    return members


def write_caption(tar: tarfile.TarFile, keys: UniqueKeys, line: dict, json_line: str,
                  output_keys: list[str], copy_images: bool) -> None:
    """Add a caption line to a shard being written, as its sample (see the module)."""
    write_sample(tar, keys.unique(sample_key(line)),
                 sample_members(line, json_line, output_keys, copy_images))


class _EndProbe(tarfile.TarInfo):
    """Notes on the tar being read (``tar.ended``) whether its end-of-archive blocks came."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.ended = True  # type: ignore[attr-defined]
            raise


class _Sample:
    """A sample being read back: its key, ``.json`` text and images by number."""

    def __init__(self, key: str):
        self.key = key
        self.text: str | None = None
        self.images: dict[int, bytes] = {}

    def done(self, with_images: bool) -> tuple[str | None, list[bytes] | None]:
        return self.text, ([self.images[n] for n in sorted(self.images)] if with_images
                           else None)


def caption_samples(handle: BinaryIO, with_images: bool, max_json_bytes: int
                    ) -> Iterator[tuple[str | None, list[bytes] | None]]:
    """Each sample of a caption shard, streamed from ``handle``: (its ``.json`` text or None,
    its images in order when ``with_images``, else None).

    Raises tarfile.TarError, EOFError (cut short) or OSError where the shard cannot be read on;
    the samples before were yielded. Members over MAX_MEMBER_BYTES are skipped unread.
    """
    tar = tarfile.open(fileobj=handle, mode="r|", tarinfo=_EndProbe)
    tar.ended = False  # type: ignore[attr-defined]
    sample: _Sample | None = None
    while (info := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header it read
        match = KEY_AND_EXTENSION.match(info.name) if info.isreg() else None
        if match is None:
            continue
        key, extension = match.group(1), match.group(2)
        if sample is None or key != sample.key:
            if sample is not None:
                yield sample.done(with_images)
            sample = _Sample(key)
        if extension == "json":
            sample.text = _text(tar, info, max_json_bytes)
        elif (with_images and (image := _IMAGE_MEMBER.fullmatch(extension))
              and image.group(2) in _IMAGE_EXTENSIONS
              and info.size <= MAX_MEMBER_BYTES):
            sample.images[int(image.group(1) or 0)] = member_data(tar, info)
    if sample is not None:  # its .json is whole, whatever came after it
        yield sample.done(with_images)
    if not tar.ended:  # type: ignore[attr-defined]
        raise EOFError(f"the tar shard ends at offset {tar.offset} without its end-of-archive "
                       "blocks")


def _text(tar: tarfile.TarFile, info: tarfile.TarInfo, max_bytes: int) -> str | None:
    if info.size > max_bytes:
        return None
    try:
        return member_data(tar, info).decode("utf-8")
    except UnicodeDecodeError:
        return None
