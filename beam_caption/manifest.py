"""ReadManifests: JSON-array and JSONL manifests in, one keyed element per record out.

Each element is a dict ``{"key", "source": {"file", "index"}, "record"}``; the key
``FILE#INDEX`` is stable across runs as long as the manifest is unchanged, which is what
resume relies on. Lines or array items that cannot be parsed become failure elements
``{"key", "source", "raw", "error"}`` on the ``failures`` output, so nothing is lost.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import zipfile
from typing import Iterator

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics

from beam_caption.errors import CaptionError, UsageError, has_lone_surrogate

FAILURES = "failures"
METRICS_NAMESPACE = "beam_caption"
RAW_TEXT_LIMIT = 10_000
MAX_DEPTH = 100  # records nested deeper are refused: Beam's coders and json.dumps recurse
_CHUNK_CHARS = 1 << 20
_CHUNK_BYTES = 1 << 16  # small: a stream that breaks part-way (corrupt gzip) loses little
_WHITESPACE = " \t\r\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_STRUCTURE = re.compile(r"[\"'\[\]{},]")
_DOUBLE_QUOTE_END = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)
_SINGLE_QUOTE_END = re.compile(r"(?:[^'\\]|\\.)*'", re.DOTALL)
_LONE_SURROGATE_PROBLEM = ("lone_surrogate", "holds a lone surrogate escape (such as \\ud800), "
                                             "which is not valid Unicode text")

_LOG = logging.getLogger(__name__)


def match_manifests(patterns: list[str]) -> list[str]:
    """Expand paths, globs and URLs to a sorted list of manifest files.

    Raises UsageError naming the pattern when one matches nothing, so a typo fails the
    launch instead of producing an empty run.
    """
    files: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if glob.has_magic(path):
            entries = list(fs.glob(path, detail=True).values())
        else:
            try:
                entries = [fs.info(path)]
            except FileNotFoundError:
                entries = []
        matched = sorted(e["name"] for e in entries if e["type"] == "file")
        if not matched:
            raise UsageError(f"no manifest file matches {pattern!r}")
        files.extend(_full_name(fs, p) for p in matched)
    return list(dict.fromkeys(files))


def _full_name(fs, path: str) -> str:
    if "file" in _protocols(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def record_key(file: str, index: int) -> str:
    return f"{file}#{index}"


def parse_key(key: str) -> tuple[str, int]:
    file, _, index = key.rpartition("#")
    return file, int(index)


def iter_manifest(file: str) -> Iterator[dict]:
    """Stream one manifest's elements (records and read failures) without loading it whole.

    One bad line or array item is one failure, and reading goes on. A file that stops being
    readable part-way (corrupt gzip, not a zip, storage error) yields one failure element at
    the next index, saying from where on it was not read.
    """
    next_index = 0
    try:
        with fsspec.open(file, "rb", compression="infer") as handle:
            if _is_json_array(file, handle):
                elements = _iter_json_array(file, io.TextIOWrapper(handle, encoding="utf-8"))
            else:
                elements = _iter_jsonl(file, handle)
            for element in elements:
                next_index = element["source"]["index"] + 1
                yield element
    except Exception as exc:  # any storage or format error costs this manifest's rest only
        if not isinstance(exc, (OSError, UnicodeDecodeError, EOFError, zipfile.BadZipFile)):
            _LOG.exception("unexpected error reading %s", file)
        yield _failure_element(
            record_key(file, next_index), {"file": file, "index": next_index}, "",
            "manifest_unreadable",
            f"{file} could not be read from record {next_index} on: {type(exc).__name__}: {exc}")


def _is_json_array(file: str, handle) -> bool:
    """JSONL by name (.jsonl, .ndjson), else a JSON array when the first character is '['."""
    name = file.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return False
    first = ""
    while not first:
        chunk = handle.read(4096)
        if not chunk:
            break
        first = chunk.lstrip(_WHITESPACE.encode() + b"\xef\xbb\xbf")[:1]
    handle.seek(0)
    return first == b"["


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _decode_error(exc: Exception) -> tuple[str, str]:
    """(type, message) of a value that could not be decoded."""
    if isinstance(exc, RecursionError):
        return "too_deep", "nested too deeply to decode"
    if isinstance(exc, json.JSONDecodeError):
        return "malformed_json", f"{exc.msg} at column {exc.colno}"
    return "malformed_json", str(exc)  # NaN/Infinity, integers over 4,300 digits


def _value_problem(value) -> tuple[str, str] | None:
    """(type, message) when a decoded value cannot travel through the pipeline, else None:
    nested deeper than MAX_DEPTH (coders and json.dumps recurse), or a string holding a lone
    surrogate (not encodable as UTF-8)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return "too_deep", f"nested deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                if any(map(has_lone_surrogate, item)):
                    return _LONE_SURROGATE_PROBLEM
                item = item.values()
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and has_lone_surrogate(item):
            return _LONE_SURROGATE_PROBLEM
    return None


def _record_element(file: str, index: int, value, raw: str, where: str) -> dict:
    source = {"file": file, "index": index}
    key = record_key(file, index)
    problem = _value_problem(value)
    if problem:
        return _failure_element(key, source, raw[:RAW_TEXT_LIMIT], problem[0],
                                f"{where}: {problem[1]}")
    if not isinstance(value, dict):
        return _failure_element(
            key, source, raw[:RAW_TEXT_LIMIT], "record_not_object",
            f"{where}: record is a JSON {type(value).__name__}, not an object")
    return {"key": key, "source": source, "record": value}


def _failure_element(key: str, source: dict, raw: str, type_: str, message: str) -> dict:
    error = CaptionError("read", type_, message)
    return {"key": key, "source": source, "raw": raw, "error": error.to_dict()}


def _lines(handle) -> Iterator[bytes]:
    """The lines of a binary handle, ended by \\n, \\r\\n or a lone \\r, read in chunks."""
    rest = b""
    read = getattr(handle, "read1", handle.read)  # read1: what is there, not a full chunk
    while chunk := read(_CHUNK_BYTES):
        data = rest + chunk
        held = data.endswith(b"\r")  # maybe the first half of \r\n: decide with the next chunk
        *lines, rest = _LINE_END.split(data[:-1] if held else data)
        if held:
            rest += b"\r"
        yield from lines
    *lines, last = _LINE_END.split(rest)
    yield from lines
    if last:
        yield last


def _iter_jsonl(file: str, handle) -> Iterator[dict]:
    """Lines of a binary handle; each is decoded on its own, so one bad line loses one record."""
    for index, line in enumerate(_lines(handle)):
        raw = line.strip().removeprefix(b"\xef\xbb\xbf") if index == 0 else line.strip()
        if not raw:
            continue
        source = {"file": file, "index": index}
        where = f"line {index + 1} of {file}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _failure_element(
                record_key(file, index), source, raw.decode("utf-8", "replace")[:RAW_TEXT_LIMIT],
                "bad_utf8", f"{where}: not UTF-8 ({exc.reason})")
            continue
        try:
            value = _DECODER.decode(text)
        except (ValueError, RecursionError) as exc:
            type_, message = _decode_error(exc)
            yield _failure_element(record_key(file, index), source, text[:RAW_TEXT_LIMIT],
                                   type_, f"{where}: {message}")
            continue
        yield _record_element(file, index, value, text, where)


def _item_end(buffer: str, pos: int) -> int | None:
    """Where the array item starting at ``pos`` ends: the index of the ',' or ']' that follows
    it at the array's own level, or None when the buffer ends first. Tolerant of broken items:
    single-quoted strings are skipped like double-quoted ones."""
    depth = 0
    while True:
        match = _STRUCTURE.search(buffer, pos)
        if match is None:
            return None
        char, pos = match.group(), match.end()
        if char in "\"'":
            closing = _DOUBLE_QUOTE_END if char == '"' else _SINGLE_QUOTE_END
            end = closing.search(buffer, pos)
            if end is None:
                return None
            pos = end.end()
        elif char in "[{":
            depth += 1
        elif depth == 0:  # ',' or a closing bracket of the array itself
            return match.start()
        elif char in "]}":
            depth -= 1


def _iter_json_array(file: str, handle) -> Iterator[dict]:
    """Items of a top-level JSON array, decoded one at a time from a growing buffer.

    A bad item is one failure: reading goes on at the next item boundary.
    """
    buffer = ""
    pos = 0
    eof = False
    index = 0
    expect = "["

    def fill() -> bool:
        nonlocal buffer, pos, eof
        chunk = handle.read(_CHUNK_CHARS)
        if not chunk:
            eof = True
            return False
        buffer = buffer[pos:] + chunk
        pos = 0
        return True

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos] in _WHITESPACE + "\ufeff":
                pos += 1
            if pos < len(buffer) or not fill():
                return

    while True:
        skip_ws()
        if pos >= len(buffer):
            if expect != "done":
                yield _truncated_array(file, index)
            return
        char = buffer[pos]
        if expect == "[":
            pos += 1
            expect = "item_or_end"
            continue
        if expect in ("item_or_end", "comma_or_end", "item") and char == "]":
            expect = "done"  # "item" here: a trailing comma, a common hand edit
            pos += 1
            continue
        if expect == "comma_or_end":
            if char != ",":
                yield _bad_array(file, index, buffer[pos:pos + 200],
                                 f"expected ',' or ']', got {char!r}")
                return
            pos += 1
            expect = "item"
            continue
        if expect == "done":
            yield _bad_array(file, index, buffer[pos:pos + 200], "extra data after the closing ']'")
            return
        where = f"item {index} of {file}"
        while True:
            try:
                value, end = _DECODER.raw_decode(buffer, pos)
                yield _record_element(file, index, value, buffer[pos:end], where)
                break
            except (ValueError, RecursionError) as exc:
                end = _item_end(buffer, pos)
                if end is None and not eof and fill():
                    continue  # the item may just be cut by the chunk boundary
                if end is None:
                    yield _truncated_array(file, index)
                    return
                type_, message = _decode_error(exc)
                yield _failure_element(record_key(file, index), {"file": file, "index": index},
                                       buffer[pos:end].strip()[:RAW_TEXT_LIMIT], type_,
                                       f"{where}: {message}")
                break
        pos = end
        index += 1
        expect = "comma_or_end"


def _truncated_array(file: str, index: int) -> dict:
    return _bad_array(file, index, "", f"JSON array ends early after {index} items")


def _bad_array(file: str, index: int, raw: str, message: str) -> dict:
    return _failure_element(record_key(file, index), {"file": file, "index": index}, raw,
                            "malformed_json", f"{file}: {message}; the rest of the file is unread")


class _ReadManifestFile(beam.DoFn):
    def __init__(self):
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._unreadable = Metrics.counter(METRICS_NAMESPACE, "records_unreadable")

    def process(self, file: str):
        for element in iter_manifest(file):
            if "error" in element:
                self._unreadable.inc()
                yield beam.pvalue.TaggedOutput(FAILURES, element)
            else:
                self._read.inc()
                yield element


class ReadManifests(beam.PTransform):
    """Read manifest files into keyed record elements, with a ``failures`` side output.

    ``files`` are already-matched file names or URLs (see :func:`match_manifests`). The
    records are reshuffled so that one big manifest is captioned by every worker.
    """

    def __init__(self, files: list[str]):
        super().__init__()
        if not files:
            raise ValueError("ReadManifests needs at least one file")
        self._files = list(files)

    def expand(self, pbegin):
        read = (
            pbegin
            | "ManifestFiles" >> beam.Create(self._files)
            | "ReshuffleFiles" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(_ReadManifestFile()).with_outputs(FAILURES, main="records"))
        records = read.records | "ReshuffleRecords" >> beam.Reshuffle()
        return {"records": records, FAILURES: read[FAILURES]}
