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
import os
from typing import Iterator

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics

from beam_caption.errors import CaptionError, UsageError

FAILURES = "failures"
METRICS_NAMESPACE = "beam_caption"
RAW_TEXT_LIMIT = 10_000
_CHUNK_CHARS = 1 << 20
_WHITESPACE = " \t\r\n"


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

    A file that stops being readable part-way (bad UTF-8, corrupt gzip, storage error)
    yields one failure element at the next index, saying from where on it was not read.
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
    except (OSError, UnicodeDecodeError, EOFError) as exc:
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


def _record_element(file: str, index: int, value) -> dict:
    source = {"file": file, "index": index}
    key = record_key(file, index)
    if not isinstance(value, dict):
        return _failure_element(
            key, source, json.dumps(value, ensure_ascii=False)[:RAW_TEXT_LIMIT],
            "record_not_object", f"record is a JSON {type(value).__name__}, not an object")
    return {"key": key, "source": source, "record": value}


def _failure_element(key: str, source: dict, raw: str, type_: str, message: str) -> dict:
    error = CaptionError("read", type_, message)
    return {"key": key, "source": source, "raw": raw, "error": error.to_dict()}


def _iter_jsonl(file: str, handle) -> Iterator[dict]:
    """Lines of a binary handle; each is decoded on its own, so one bad line loses one record."""
    for index, line in enumerate(handle):
        raw = line.strip().removeprefix(b"\xef\xbb\xbf") if index == 0 else line.strip()
        if not raw:
            continue
        source = {"file": file, "index": index}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _failure_element(
                record_key(file, index), source, raw.decode("utf-8", "replace")[:RAW_TEXT_LIMIT],
                "bad_utf8", f"line {index + 1} of {file}: not UTF-8 ({exc.reason})")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield _failure_element(
                record_key(file, index), source, text[:RAW_TEXT_LIMIT],
                "malformed_json", f"line {index + 1} of {file}: {exc.msg} at column {exc.colno}")
            continue
        yield _record_element(file, index, value)


def _iter_json_array(file: str, handle) -> Iterator[dict]:
    """Items of a top-level JSON array, decoded one at a time from a growing buffer."""
    decoder = json.JSONDecoder()
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
        if expect in ("item_or_end", "comma_or_end") and char == "]":
            expect = "done"
            pos += 1
            continue
        if expect == "comma_or_end":
            if char != ",":
                yield _bad_array(file, index, buffer[pos:pos + 200], f"expected ',' or ']', got {char!r}")
                return
            pos += 1
            expect = "item"
            continue
        if expect == "done":
            yield _bad_array(file, index, buffer[pos:pos + 200], "extra data after the closing ']'")
            return
        while True:
            try:
                value, end = decoder.raw_decode(buffer, pos)
                break
            except json.JSONDecodeError as exc:
                if eof or not fill():
                    yield _bad_array(file, index, buffer[pos:pos + RAW_TEXT_LIMIT],
                                     f"item {index}: {exc.msg}")
                    return
        pos = end
        yield _record_element(file, index, value)
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
