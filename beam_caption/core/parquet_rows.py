"""Reading Parquet tables: one element per row, its image bytes with it when the table holds
them (no Beam here).

A table is split by row group (``row_groups``, from the footer only); ``iter_rows`` reads one
row group and yields per row::

    {"key": "FILE#ROW", "source": {"file": FILE, "index": ROW}, "record": {COLUMN: VALUE, ...},
     "images": [IMAGE_BYTES, ...]}

where ROW counts the file's rows from 0 and FILE is the file's name without URL credentials or
query (``redact_url``). The image column (``--image_key``) may hold:

- a path or URL string, or a list of them: the record keeps it, for the engine to read like a
  manifest's (``--image_root`` applies); the element has no ``images``;
- image bytes, or Hugging Face's ``Image`` struct ``{bytes, path}`` (bytes win; a struct with
  only a path is that path), or a list of either: the bytes go to ``images`` (in order) and
  never to the record, whose image field keeps what is left: the structs' paths (a string,
  or a list of them, null where a struct had none), or null for bare bytes.

A row whose image value is null (``no_image``), a struct with neither bytes nor path
(``no_image_in_struct``), a list mixing bytes and paths (``mixed_image_list``) or a value of
another kind, such as a number (``bad_image_value``), becomes a failure element (stage
``read``; its record has the image field null, the message says what it held). So does a row
with a value ``json_value`` cannot write (``unsupported_value``), every row of a file without
the image column (``missing_image_key``; ``check_image_column`` says so at launch), and every
row of a row group that cannot be read (``parquet_unreadable``). Only those rows fail.

The other columns become JSON values, losslessly given the column's type, by ``json_value``:

- null, booleans, integers, strings, finite floats: as they are; NaN, infinities: the strings
  ``"NaN"``, ``"Infinity"``, ``"-Infinity"``;
- bytes: ``{"$base64": "..."}`` (standard alphabet, padded);
- decimals: their exact text (Python's ``str``: ``"12.30"``, ``"1E+3"``);
- timestamps: ISO 8601, ``"2024-05-01T12:00:00.250000+02:00"`` (the offset when the column has
  a time zone, none when it is naive; the fraction in 6 digits, or 9 for nanoseconds that are
  not whole microseconds; none when zero); dates ``"2024-05-01"``; times ``"12:00:00.250000"``;
  durations ``"PT90.5S"`` (exact seconds; ``"-PT90.5S"`` when negative);
- structs: objects; lists: arrays; maps: an object when its keys are unique strings, else an
  array of ``[key, value]`` pairs (an empty map is ``[]``); intervals: ``[months, days,
  nanoseconds]``.

Memory: one row group per call. pyarrow holds the group's column data while its rows are
read (measured: about 1 to 2 times the group's size, whatever the batch size or read buffer,
for a group of image bytes), and rows become Python values ``BATCH_ROWS`` at a time. So a
worker needs a few times the largest row group in memory: Hugging Face writes image tables in
groups of 100 rows (tens of MB); a table written as one huge row group costs that much.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import functools
import math
import uuid
import zoneinfo
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from beam_caption.core.errors import CaptionError, UsageError, encodable
from beam_caption.core.records import failure_element, record_key
from beam_caption.core.redact import redact_url, scrub

BATCH_ROWS = 64  # rows made Python values at a time
_EPOCH = datetime.datetime(1970, 1, 1)
_IMAGE_FORMS = "a path or URL string, a list of them, image bytes or a {bytes, path} struct"


def row_groups(file: str) -> list[tuple[str, int, int, int]]:
    """``(file, row group, its first row, its rows)`` for each row group, from the footer.

    ``file`` is given back as given (credentials included: it is what ``iter_rows`` reads);
    the sum of the rows is the file's element count.

    Raises:
        UsageError: when the file is not a readable Parquet file.
    """
    with fsspec.open(file, "rb") as handle:
        metadata = _parquet_file(file, handle).metadata
    groups = []
    first = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        groups.append((file, group, first, rows))
        first += rows
    return groups


def check_image_column(file: str, image_key: str) -> None:
    """Refuse at launch a table whose schema cannot give images under ``image_key``.

    Raises:
        UsageError: one line, when the file has no such column or its type holds no image
            (numbers, booleans, dates...), or it is not a readable Parquet file.
    """
    with fsspec.open(file, "rb") as handle:
        schema = _parquet_file(file, handle).schema_arrow
    name = redact_url(file)
    if image_key not in schema.names:
        raise UsageError(f"--image_key {image_key}: {name} has no such column (columns: "
                         f"{', '.join(schema.names)})")
    column_type = schema.field(image_key).type
    if not image_forms(column_type):
        raise UsageError(f"--image_key {image_key}: the column of {name} is {column_type}, "
                         f"which holds no image ({_IMAGE_FORMS})")


def _parquet_file(file: str, handle) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except pa.ArrowInvalid as exc:
        raise UsageError(f"{redact_url(file)} is not a readable Parquet file: "
                         f"{scrub(str(exc))}") from None


def image_forms(column_type: pa.DataType, in_list: bool = False) -> set[str]:
    """What a Parquet column of this type can hold as an image: ``path`` (strings, a struct's
    ``path``), ``bytes`` (binary, a struct's ``bytes``), for a list also of its items; empty
    for a column that cannot hold an image."""
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        return {"path"}
    if (pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
            or pa.types.is_fixed_size_binary(column_type)):
        return {"bytes"}
    if pa.types.is_struct(column_type):
        return {field.name for field in column_type} & {"bytes", "path"}
    if (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
            or pa.types.is_fixed_size_list(column_type)) and not in_list:
        return image_forms(column_type.value_type, in_list=True)
    return set()


def iter_rows(file: str, group: int, first_row: int, image_key: str) -> Iterator[dict]:
    """Stream one row group's elements: a row, with its image bytes when the table holds
    them, or the row's failure (see the module docstring).

    Args:
        file: a local path or any fsspec URL (as ``row_groups`` gave it).
        group: the row group's index in the file.
        first_row: the file's row number of the group's first row (keys are ``FILE#ROW``).
        image_key: the image column.
    """
    url, name = file, redact_url(file)
    row, end = first_row, first_row + 1  # end: past the rows known to exist
    try:
        with fsspec.open(url, "rb") as handle:
            table = pq.ParquetFile(handle)
            end = first_row + table.metadata.row_group(group).num_rows
            for batch in table.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                for values in _python_rows(batch):
                    yield _row_element(name, row, values, image_key)
                    row += 1
    except (OSError, pa.ArrowException) as exc:  # storage errors, corrupt data
        reason = " ".join(scrub(str(exc).replace(url, name)).split()) or type(exc).__name__
        for lost in range(row, max(end, row + 1)):
            yield failure_element(record_key(name, lost), {"file": name, "index": lost},
                                  CaptionError("read", "parquet_unreadable", (
                                      f"row {lost} of {name} (row group {group}) could not be "
                                      f"read: {reason}")), raw="")


def _row_element(file: str, row: int, values: dict, image_key: str) -> dict:
    key, source = record_key(file, row), {"file": file, "index": row}
    where = f"row {row} of {file}"
    images, image_field, error = None, None, None
    if image_key not in values:
        error = CaptionError("read", "missing_image_key",
                             f"{where} has no {image_key!r} column")
    else:
        try:
            images, image_field = _image_value(values[image_key], f"{where}: {image_key!r}")
        except CaptionError as exc:
            error = exc
    record = {}
    for column, value in values.items():
        if column == image_key:
            record[column] = image_field
            continue
        try:
            record[column] = json_value(value)
        except TypeError as exc:
            record[column] = None
            error = error or CaptionError("read", "unsupported_value",
                                          f"{where}: column {column!r}: {exc}")
    if error is not None:
        return failure_element(key, source, error, record=record)
    element: dict = {"key": key, "source": source, "record": record}
    if images is not None:
        element["images"] = images
    return element


def _image_value(value, where: str) -> tuple[list[bytes] | None, object]:
    """(the image bytes, or None when the value names paths; what the record keeps)."""
    if not isinstance(value, list):
        data, kept = _image_item(value, where)
        return (None if data is None else [data]), kept
    items = [_image_item(item, f"{where} item {i}") for i, item in enumerate(value)]
    images = [data for data, _ in items if data is not None]
    if images and len(images) < len(items):
        raise CaptionError("read", "mixed_image_list",
                           f"{where} mixes image bytes and paths in one list")
    return images or None, [kept for _, kept in items]


def _image_item(value, where: str) -> tuple[bytes | None, str | None]:
    """(the image's bytes or None, its path or None) of one image value."""
    if isinstance(value, str):
        return None, value
    if isinstance(value, bytes):
        return value, None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        path = path if isinstance(path, str) and path else None
        if isinstance(data, bytes) and data:
            return data, path
        if path is not None:
            return None, path
        raise CaptionError("read", "no_image_in_struct",
                           f"{where} is a struct with neither bytes nor a path")
    if value is None:
        raise CaptionError("read", "no_image", f"{where} is null")
    raise CaptionError("read", "bad_image_value", (
        f"{where} holds a {type(value).__name__} ({str(value)[:100]}), not {_IMAGE_FORMS}"))


def json_value(value):
    """``value`` (as pyarrow gives a Parquet value to Python) in the JSON form of the module
    docstring: lossless given the column's type.

    Raises:
        TypeError: for a value of a kind the form does not cover.
    """
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {encodable(str(name)): json_value(item) for name, item in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(item, tuple) and len(item) == 2 for item in value):
            return _map_value(value)  # pyarrow gives a map as (key, value) tuples
        return [json_value(item) for item in value]
    if isinstance(value, tuple):  # an interval (months, days, nanoseconds)
        return [json_value(item) for item in value]
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return _duration_text(
            (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds, 6)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"no JSON form for a {type(value).__name__}")


def _map_value(pairs: list[tuple]) -> dict | list:
    keys = [key for key, _ in pairs]
    if all(isinstance(key, str) for key in keys) and len(set(keys)) == len(keys):
        return {encodable(key): json_value(item) for key, item in pairs}
    return [[json_value(key), json_value(item)] for key, item in pairs]


def _duration_text(units: int, digits: int) -> str:
    """ISO 8601 duration of ``units`` (10**-digits seconds each): exact seconds."""
    seconds, fraction = divmod(abs(units), 10**digits)
    text = f"{seconds}.{fraction:0{digits}d}".rstrip("0").rstrip(".")
    return f"{'-' if units < 0 else ''}PT{text}S"


# Nanosecond temporal values: pyarrow gives them to Python only through pandas (or refuses
# them), so they are read as int64 and written here.


def _is_nanoseconds(column_type: pa.DataType) -> bool:
    return ((pa.types.is_timestamp(column_type) or pa.types.is_time64(column_type)
             or pa.types.is_duration(column_type)) and column_type.unit == "ns")


def _int64_for_ns(column_type: pa.DataType) -> pa.DataType:
    """``column_type`` with each nanosecond temporal type in it made int64."""
    if _is_nanoseconds(column_type):
        return pa.int64()
    if pa.types.is_struct(column_type):
        return pa.struct([field.with_type(_int64_for_ns(field.type)) for field in column_type])
    if pa.types.is_map(column_type):
        return pa.map_(column_type.key_field.with_type(_int64_for_ns(column_type.key_type)),
                       column_type.item_field.with_type(_int64_for_ns(column_type.item_type)))
    if pa.types.is_list(column_type) or pa.types.is_large_list(column_type):
        make = pa.list_ if pa.types.is_list(column_type) else pa.large_list
        return make(column_type.value_field.with_type(_int64_for_ns(column_type.value_type)))
    if pa.types.is_fixed_size_list(column_type):
        return pa.list_(column_type.value_field.with_type(
            _int64_for_ns(column_type.value_type)), column_type.list_size)
    return column_type


def _ns_values(value, column_type: pa.DataType):
    """A value read with ``_int64_for_ns``'s type, its nanosecond values made text."""
    if value is None:
        return None
    if _is_nanoseconds(column_type):
        return _ns_text(value, column_type)
    if pa.types.is_struct(column_type):
        return {field.name: _ns_values(value[field.name], field.type) for field in column_type}
    if pa.types.is_map(column_type):
        return [(_ns_values(key, column_type.key_type), _ns_values(item, column_type.item_type))
                for key, item in value]
    if (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
            or pa.types.is_fixed_size_list(column_type)):
        return [_ns_values(item, column_type.value_type) for item in value]
    return value


def _ns_text(nanoseconds: int, column_type: pa.DataType) -> str:
    if pa.types.is_duration(column_type):
        return _duration_text(nanoseconds, 9)
    seconds, fraction = divmod(nanoseconds, 10**9)
    digits = "" if not fraction else (f".{fraction // 1000:06d}" if fraction % 1000 == 0
                                      else f".{fraction:09d}")
    if pa.types.is_time64(column_type):
        return (_EPOCH + datetime.timedelta(seconds=seconds)).time().isoformat() + digits
    moment = _EPOCH + datetime.timedelta(seconds=seconds)
    if column_type.tz is not None:
        moment = moment.replace(tzinfo=datetime.UTC).astimezone(_zone(column_type.tz))
    text = moment.isoformat()  # YYYY-MM-DDTHH:MM:SS[+HH:MM]
    return text[:19] + digits + text[19:]


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> datetime.tzinfo:
    """A column's time zone: a fixed offset (``+02:00``) or an IANA name."""
    if name[:1] in "+-":
        zone = datetime.datetime.strptime(name, "%z").tzinfo
        assert zone is not None
        return zone
    return zoneinfo.ZoneInfo(name)


def _python_rows(batch: pa.RecordBatch) -> list[dict]:
    """The batch's rows as Python values (column name -> value)."""
    columns = []
    for field, column in zip(batch.schema, batch.columns, strict=True):
        readable = _int64_for_ns(field.type)
        if readable == field.type:
            columns.append(column.to_pylist())
        else:
            columns.append([_ns_values(value, field.type)
                            for value in column.cast(readable).to_pylist()])
    names = batch.schema.names
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
