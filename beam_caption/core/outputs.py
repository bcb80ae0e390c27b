"""Output file formats: their names, their fixed Parquet schema, and reading them back.

Captions, failures and set-aside captions are written (transforms/write.py) as

- ``jsonl``: one JSON object per line (the default);
- ``json``: a JSON array per shard, one element per line (``[``, ``{...},``, ..., ``]``), so
  the files stay line-readable (``--resume`` reads them as text);
- ``parquet``: a fixed schema (``PARQUET_COLUMNS``): the main fields as typed columns (a
  WebDataset sample's ``__key__`` and ``__url__`` among them, so a caption joins back to its
  sample) and the whole output line as JSON in ``line``, so no record field is lost whatever
  its shape;
- ``webdataset``: captions (and set-aside captions) as tar shards of samples ``KEY.json`` (the
  jsonl line), ``KEY.txt`` (the caption) and, with ``--copy_images``, the image
  (core/caption_shards.py); failures stay JSON lines (``failures_format``), as a loader of the
  captioned set wants only captions.

``jsonl`` and ``json`` may be gzip-compressed (``.gz``). Shards are named
``PREFIX-SSSSS-of-NNNNN`` + the format's suffix (``is_shard_name``): only such files are read,
moved or deleted, never another file that merely looks alike (``captions-notes-of-bob.txt``).
Reading is bounded and tolerant (``element_texts``): a line that is not text costs that line,
a damaged file (corrupt gzip, truncated Parquet or tar) is read up to the damage. This module
needs no Beam, so the report and user scripts read outputs without it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import fsspec

from beam_caption.core.caption_shards import caption_samples
from beam_caption.core.records import without_image_bytes

CAPTIONS_PREFIX = "captions"
FAILURES_PREFIX = "failures"
SET_ASIDE_PREFIX = "set_aside"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
SHARDS = "-*-of-*"  # matches a prefix's shard files in any format
SUFFIXES = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "webdataset": ".tar"}
DAMAGED_DIR = "damaged"  # earlier files --resume could not read whole (transforms/skip_done.py)
MAX_LINE_BYTES = 1 << 26  # longer lines of an output file are skipped unread (a record is 16 MiB)
# What reading a damaged file raises: corrupt gzip (BadGzipFile is an OSError, zlib.error, a
# stream cut short: EOFError), Parquet that is truncated or foreign (ArrowInvalid: ValueError)
# or holds corrupt pages (OSError), a tar that is truncated or corrupt (TarError, EOFError).
DAMAGE_ERRORS = (OSError, EOFError, zlib.error, ValueError, tarfile.TarError)
_SHARD_SUFFIX = re.compile(r"-\d{5,}-of-\d{5,}(\.jsonl(\.gz)?|\.json(\.gz)?|\.parquet|\.tar)")
# One column per main field; answers (each output key) are JSON text, as their values may be
# structured; ``__key__`` and ``__url__`` are a WebDataset sample's (null for other records).
# The whole output line is in ``line``.
PARQUET_COLUMNS = (
    ("key", "string"), ("__key__", "string"), ("__url__", "string"),
    ("image", "list<string>"), ("answers", "string"),
    ("model", "string"), ("attempts", "int64"), ("latency_ms", "double"),
    ("prompt_tokens", "int64"), ("completion_tokens", "int64"), ("finish_reason", "string"),
    ("error_stage", "string"), ("error_type", "string"), ("error_message", "string"),
    ("line", "string"),
)


def file_suffix(output_format: str, compression: str = "none") -> str:
    """The file name ending of an output format (``.jsonl``, ``.json.gz``, ``.parquet``...)."""
    return SUFFIXES[output_format] + (".gz" if compression == "gzip" else "")


def failures_format(output_format: str) -> str:
    """The format failure files are written in: ``output_format``'s, but JSON lines beside
    WebDataset caption shards."""
    return "jsonl" if output_format == "webdataset" else output_format


def is_shard_name(name: str, prefix: str) -> bool:
    """Whether the file name ``name`` (no folder) is one of ``prefix``'s shards as the project
    writes them (``PREFIX-00000-of-00002.jsonl.gz``...)."""
    return (name.startswith(prefix)
            and _SHARD_SUFFIX.fullmatch(name, len(prefix)) is not None)


def shard_paths(paths: list[str], prefix: str) -> list[str]:
    """The paths among ``paths`` (matches of ``PREFIX{SHARDS}``) that are ``prefix``'s shards."""
    return [path for path in paths if is_shard_name(path.rsplit("/", 1)[-1], prefix)]


def parquet_row(element: dict, image_key: str, output_keys: list[str]) -> dict:
    """A caption or failure line as a row of the fixed Parquet schema."""
    meta = element.get("caption_meta") or {}
    error = element.get("error") or {}
    record = element.get("record", element) if error else element
    images = record.get(image_key) if isinstance(record, dict) else None
    answers = {key: element[key] for key in output_keys if key in element} if not error \
        else element.get("answers", {})
    return {
        "key": meta.get("key") or element.get("key"),
        **{name: _text(record.get(name)) if isinstance(record, dict) else None
           for name in ("__key__", "__url__")},
        "image": [images] if isinstance(images, str) else
        [str(i) for i in images] if isinstance(images, list) else None,
        "answers": json.dumps(answers, ensure_ascii=False) if answers else None,
        "model": meta.get("model"), "attempts": meta.get("attempts", error.get("attempts")),
        "latency_ms": meta.get("latency_ms"), "prompt_tokens": meta.get("prompt_tokens"),
        "completion_tokens": meta.get("completion_tokens"),
        "finish_reason": meta.get("finish_reason"), "error_stage": error.get("stage"),
        "error_type": error.get("type"), "error_message": error.get("message"),
        "line": json.dumps(without_image_bytes(element), ensure_ascii=False,
                           separators=(",", ":")),
    }


def _text(value: object) -> str | None:
    """A record's key or URL field as a string column: text, or an integer as text."""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def parquet_schema():
    """The pyarrow schema of PARQUET_COLUMNS (pyarrow imported here: the parquet extra)."""
    import pyarrow as pa

    kinds = {"string": pa.string(), "int64": pa.int64(), "double": pa.float64(),
             "list<string>": pa.list_(pa.string())}
    return pa.schema([(name, kinds[kind]) for name, kind in PARQUET_COLUMNS])


@dataclasses.dataclass
class Unread:
    """What reading output files skipped: elements that are not JSON objects, and the damaged
    files (why each stopped being read)."""

    elements: int = 0
    damaged: dict[str, str] = dataclasses.field(default_factory=dict)


def read_output_records(output_dir: str, prefix: str,
                        unread: Unread | None = None) -> Iterator[dict]:
    """The JSON objects of ``OUTDIR/PREFIX-*`` shards in any output format, file by file, in
    name order (any fsspec URL). What cannot be read is skipped and noted in ``unread``."""
    unread = unread if unread is not None else Unread()
    fs, root = fsspec.core.url_to_fs(output_dir)
    for path in shard_paths(sorted(fs.glob(f"{root.rstrip('/')}/{prefix}{SHARDS}")), prefix):
        with fs.open(path, "rb") as handle:
            try:
                for text in element_texts(handle, path):
                    element = _json_object(text)
                    if element is None:
                        unread.elements += 1
                    else:
                        yield element
            except DAMAGE_ERRORS as exc:
                unread.damaged[path] = damage_reason(exc)


def element_texts(handle: BinaryIO, path: str) -> Iterator[str | None]:
    """The JSON text of each element of an output file (``path``'s name says its format): a
    jsonl or json line (the array's brackets left out), a Parquet row's ``line``, a tar
    sample's ``.json`` member; None for a line that is not UTF-8 or longer than MAX_LINE_BYTES
    (skipped, never held whole), a null row or a sample without ``.json``.

    Raises one of DAMAGE_ERRORS where the file cannot be read on (the elements before the
    damage were yielded); ``handle`` is binary, seekable for Parquet.
    """
    if path.endswith(".parquet"):
        yield from _parquet_texts(handle)
        return
    if path.endswith(".tar"):
        yield from (text for text, _ in caption_samples(handle, False, MAX_LINE_BYTES))
        return
    stream = gzip.GzipFile(fileobj=handle, mode="rb") if path.endswith(".gz") else handle
    while line := stream.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES:
            while line and not line.endswith(b"\n"):
                line = stream.readline(MAX_LINE_BYTES)  # the rest of the long line, dropped
            yield None
            continue
        try:
            text = line.decode("utf-8").strip().removesuffix(",")
        except UnicodeDecodeError:
            yield None
            continue
        if text not in ("", "[", "]"):
            yield text


def damage_reason(exc: BaseException) -> str:
    """Why a file could not be read on, in one short line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _json_object(text: str | None) -> dict | None:
    try:
        value = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _parquet_texts(handle: BinaryIO) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
    index = parquet.schema_arrow.get_field_index("line")
    if index < 0 or parquet.schema_arrow.field(index).type != pa.string():
        raise ValueError("no string column 'line': not a Parquet file of this project")
    for batch in parquet.iter_batches(batch_size=1024, columns=["line"]):
        for line in batch.column(0).to_pylist():
            yield line if isinstance(line, str) else None
