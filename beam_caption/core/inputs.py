"""What ``--input`` names, by file name: JSON/JSONL manifests, WebDataset tar shards or Parquet
tables, each cut into units of work and read into keyed elements (no Beam here).

- ``.tar``, ``.tar.gz``, ``.tgz`` (any case): WebDataset shards (core/webdataset.py), one unit
  per shard; the image member is the extension ``--image_key`` names (``jpg``), or, with the
  default ``image``, the first of jpg/jpeg/png/webp;
- ``.parquet``: Parquet tables (core/parquet_rows.py, needs pyarrow), one unit per row group;
  ``--image_key`` is the image column;
- anything else: a manifest (core/manifest_reader.py), one unit per file.

Elements of shards and tables that hold image bytes carry them in ``images``; the engine uses
them instead of reading paths (core/engine.py), and the fingerprint covers them
(core/identity.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from beam_caption.core.errors import UsageError
from beam_caption.core.limits import MAX_IMAGE_BYTES
from beam_caption.core.manifest_reader import count_manifest_records, iter_manifest
from beam_caption.core.redact import redact_url
from beam_caption.core.webdataset import count_samples, iter_samples

MANIFEST, WEBDATASET, PARQUET = "manifest", "webdataset", "parquet"
DEFAULT_IMAGE_KEY = "image"  # the default --image_key: in a shard, the first image member
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What a job of shards asks when no prompt is given: a sample holds no conversation.
SAMPLE_PROMPT = "Generate detailed captions based on image content."


class ReadUnit(NamedTuple):
    """One unit of reading: a whole manifest or shard, or one row group of a table."""

    file: str
    kind: str
    group: int = 0  # a table's row group
    first_row: int = 0  # the file's row number of the group's first row


def input_kind(file: str) -> str:
    """MANIFEST, WEBDATASET or PARQUET, from the file's name (a URL's query ignored)."""
    name = redact_url(file).split("?", 1)[0].lower()
    if name.endswith(_SHARD_SUFFIXES):
        return WEBDATASET
    if name.endswith(".parquet"):
        return PARQUET
    return MANIFEST


def default_prompt(files: list[str]) -> str | None:
    """The prompt a job of these (matched) input files asks without --prompt or
    --prompts_file: SAMPLE_PROMPT when they are all WebDataset shards (a sample holds no
    conversation), else None (each record's conversation)."""
    if files and all(input_kind(file) == WEBDATASET for file in files):
        return SAMPLE_PROMPT
    return None


def read_units(file: str) -> list[ReadUnit]:
    """The units ``file`` is read in (a table's row groups come from its footer)."""
    kind = input_kind(file)
    if kind != PARQUET:
        return [ReadUnit(file, kind)]
    from beam_caption.core.parquet_rows import row_groups  # pyarrow only for tables
    try:
        groups = row_groups(file)
    except (UsageError, OSError):  # read as one unit: its rows fail as parquet_unreadable
        return [ReadUnit(file, PARQUET)]
    return [ReadUnit(file, PARQUET, group, first) for _, group, first, _ in groups]


def iter_unit(unit: ReadUnit, image_key: str = DEFAULT_IMAGE_KEY,
              max_image_bytes: int = MAX_IMAGE_BYTES) -> Iterator[dict]:
    """The keyed elements (records and read failures) of one unit, streamed."""
    if unit.kind == WEBDATASET:
        image_ext = None if image_key == DEFAULT_IMAGE_KEY else image_key
        return iter_samples(unit.file, image_ext, max_member_bytes=max_image_bytes)
    if unit.kind == PARQUET:
        from beam_caption.core.parquet_rows import iter_rows
        return iter_rows(unit.file, unit.group, unit.first_row, image_key)
    return iter_manifest(unit.file)


def count_elements(file: str) -> int:
    """How many elements ``file`` gives (records and read failures): from tar headers, a
    table's footer, or a manifest's lines or items (not decoded)."""
    kind = input_kind(file)
    if kind == WEBDATASET:
        return count_samples(file)
    if kind == PARQUET:
        from beam_caption.core.parquet_rows import row_groups
        return sum(rows for *_, rows in row_groups(file))
    return count_manifest_records(file)


def check_inputs(files: list[str], image_key: str) -> None:
    """Refuse at launch, in one line, tables that cannot give images under ``image_key``
    (UsageError): no such column, a column of numbers, not a Parquet file."""
    tables = [file for file in files if input_kind(file) == PARQUET]
    if not tables:
        return
    try:
        from beam_caption.core.parquet_rows import check_image_column
    except ImportError:
        raise UsageError("Parquet input needs the parquet extra: pip install "
                         "'beam_caption[parquet]'") from None
    for table in tables:
        check_image_column(table, image_key)
