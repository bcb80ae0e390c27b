"""The image bytes of captioned records read back from the WebDataset shards and Parquet tables
they came from, by key (no Beam here): what the report's thumbnails of such records show.

A caption line of a shard's sample holds ``__url__`` (the shard) and its key ``SHARD#KEY``; one
of a table's row is keyed ``FILE#ROW`` (``image_source``). ``read_source_images`` reads each
source file once, as the job read it (core/inputs.py): a shard is streamed until every key
wanted from it is found, a table reads only the row groups of the rows wanted. A row of a table
whose image column holds paths (a string column, or a row whose struct has only a path) carries
no bytes: its record's path is read as a manifest's (a table of paths is not read at all).

Sources are read only where the report reads images itself: a local file (a regular one, so a
FIFO cannot block the read) or a storage URL such as ``gs://``; a source over http(s), or an
fsspec chain (``simplecache::...``), is refused, as it would be fetched without the URL guard of
core/http_images.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from beam_caption.core.errors import CaptionError, UsageError
from beam_caption.core.http_images import is_http_url
from beam_caption.core.inputs import PARQUET, WEBDATASET, ReadUnit, input_kind, iter_unit

# What reading a source back gave for one key: its first image's bytes; None when the element
# carries no bytes (a table's path column: read the record's path); or why it cannot be shown.
SourceImage = bytes | CaptionError | None


class ImageSource(NamedTuple):
    """Where a captioned record's image bytes are: its source file, its kind (WEBDATASET or
    PARQUET), its element key, and for a table its row."""

    file: str
    kind: str
    key: str
    row: int = 0


def image_source(line: dict, key: str) -> ImageSource | None:
    """The source of a caption line keyed ``key`` (its ``caption_meta.key``), or None when
    the record came from a manifest (or names no source that can be read back)."""
    shard = line.get("__url__")
    if (isinstance(shard, str) and key.startswith(f"{shard}#")
            and input_kind(shard) == WEBDATASET):
        return ImageSource(shard, WEBDATASET, key)
    file, _, row = key.rpartition("#")
    if file and row.isdecimal() and row.isascii() and input_kind(file) == PARQUET:
        return ImageSource(file, PARQUET, key, int(row))
    return None


def read_source_images(sources: Iterable[ImageSource], image_key: str, max_image_bytes: int,
                       threads: int = 8) -> dict[str, SourceImage]:
    """Each source's key -> what its source gives (``SourceImage``), every source file read
    once, ``threads`` files at a time. A key not found, or a file that cannot be read, is a
    CaptionError saying so; nothing raises."""
    by_file: dict[tuple[str, str], list[ImageSource]] = {}
    for source in sources:
        by_file.setdefault((source.file, source.kind), []).append(source)
    found: dict[str, SourceImage] = {}
    with ThreadPoolExecutor(threads) as pool:
        for images in pool.map(lambda wanted: _read_file(wanted, image_key, max_image_bytes),
                               by_file.values()):
            found.update(images)
    return found


def _read_file(wanted: list[ImageSource], image_key: str,
               max_image_bytes: int) -> dict[str, SourceImage]:
    """The images of the ``wanted`` keys of one source file."""
    file, kind = wanted[0].file, wanted[0].kind
    keys = {source.key for source in wanted}
    found: dict[str, SourceImage] = {}
    try:
        _check_readable(file)
        units = _units(file, kind, {source.row for source in wanted}, image_key)
        if units is None:
            return dict.fromkeys(keys)
        for unit in units:
            for element in iter_unit(unit, image_key, max_image_bytes):
                if element["key"] == f"{file}#" and "error" in element:  # the whole shard
                    raise _read_failure(element)
                if element["key"] in keys:
                    found[element["key"]] = _image_of(element, max_image_bytes)
                    if len(found) == len(keys):  # the rest of the shard is left unread
                        return found
    except CaptionError as exc:
        return {key: found.get(key, exc) for key in keys}
    except (UsageError, OSError, ValueError, ImportError) as exc:  # footers (ArrowInvalid is a
        # ValueError), storage, unknown protocols or their missing packages
        error = CaptionError("read", "source_unreadable", f"{file}: {exc}")
        return {key: found.get(key, error) for key in keys}
    missing = CaptionError("read", "not_in_source", f"the record is no longer in {file}")
    return {key: found.get(key, missing) for key in keys}


def _check_readable(file: str) -> None:
    """Refuse (CaptionError) a source read without the URL guard, or a local one that is
    missing or not a regular file."""
    if is_http_url(file) or "::" in file:
        raise CaptionError("read", "source_refused", (
            f"{file}: images of an http(s) or chained source are not read back by the report"))
    filesystem, path = fsspec.core.url_to_fs(file)
    if isinstance(filesystem, LocalFileSystem) and not os.path.isfile(path):
        if not os.path.lexists(path):
            raise CaptionError("read", "source_not_found", f"{file}: no such file")
        raise CaptionError("read", "source_unreadable", f"{file} is not a regular file")


def _units(file: str, kind: str, rows: set[int], image_key: str) -> list[ReadUnit] | None:
    """The units to read: the shard, or the row groups holding ``rows`` (from the footer);
    None for a table whose image column holds no bytes (its records' paths are read)."""
    if kind == WEBDATASET:
        return [ReadUnit(file, WEBDATASET)]
    import pyarrow.parquet as pq  # pyarrow only for tables

    from beam_caption.core.parquet_rows import image_forms, row_groups
    with fsspec.open(file, "rb") as handle:
        schema = pq.read_schema(handle)
    if image_key in schema.names and "bytes" not in image_forms(schema.field(image_key).type):
        return None
    return [ReadUnit(file, PARQUET, group, first) for _, group, first, count in row_groups(file)
            if any(first <= row < first + count for row in rows)]


def _image_of(element: dict, max_image_bytes: int) -> SourceImage:
    """An element's first image bytes, None when it carries none, or its read failure."""
    if "error" in element:
        return _read_failure(element)
    images = element.get("images")
    if not images:
        return None
    if len(images[0]) > max_image_bytes:
        return CaptionError("image", "image_too_large", (
            f"{element['key']}: the image is {len(images[0])} bytes, over the limit of "
            f"{max_image_bytes} bytes"))
    return images[0]


def _read_failure(element: dict) -> CaptionError:
    """The CaptionError of a read failure element."""
    error = element["error"]
    return CaptionError(error["stage"], error["type"], error["message"])
