"""Reading JSON-array and JSONL manifests: one keyed element per record (no Beam here;
transforms/manifests.py makes it a transform).

Each element is a dict ``{"key", "source": {"file", "index"}, "record"}``; the key
``FILE#INDEX`` is stable across runs as long as the manifest is unchanged, which is what
resume relies on. A line or array item that cannot be read (malformed, too deep, too large,
not UTF-8, not strict JSON) becomes one failure element ``{"key", "source", "raw", "error"}`` and
reading goes on, so nothing is lost and one bad value never stops the job; everything emitted
is strict JSON and encodable as UTF-8.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import re
import urllib.parse
import zipfile
import zlib
from collections.abc import Iterator

import fsspec

from beam_caption.core.errors import CaptionError, UsageError, encodable, has_lone_surrogate
from beam_caption.core.http_images import is_http_url
from beam_caption.core.records import (
    failure_element,
    record_element,
    record_key,
)
from beam_caption.core.redact import redact_url, scrub

RAW_TEXT_LIMIT = 10_000
MAX_DEPTH = 100  # records nested deeper are refused: Beam's coders and json.dumps recurse
MAX_RECORD_SIZE = 1 << 24  # longer lines (bytes) and array items (characters) are refused
_CHUNK_CHARS = 1 << 20
_CHUNK_BYTES = 1 << 16  # small: a stream that breaks part-way (corrupt gzip) loses little
_WHITESPACE = " \t\r\n"
_BOM = b"\xef\xbb\xbf"
_NOT_WHITESPACE = re.compile(f"[^{_WHITESPACE}\ufeff]")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_STRUCTURE = re.compile(r"[\"'\[\]{},]")
_STRICT_STRUCTURE = re.compile(r'["\[\]{},]')
_STRING_STOP = {'"': re.compile(r'["\\]'), "'": re.compile(r"['\\]")}
_LONE_SURROGATE_PROBLEM = ("lone_surrogate", ("holds a lone surrogate escape (such as \\ud800), "
                                              "which is not valid Unicode text"))

_LOG = logging.getLogger(__name__)


def match_manifests(patterns: list[str]) -> list[str]:
    """Expand paths, globs and URLs to a sorted list of manifest files.

    Raises UsageError naming the pattern when one matches nothing, so a typo fails the
    launch instead of producing an empty run, and naming a file whose name is not UTF-8 (its
    keys could not be written).
    """
    files: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if is_http_url(pattern):  # a URL names one file: '?' starts its query, not a glob
            if not fs.exists(pattern):
                raise UsageError(f"no manifest file at {redact_url(pattern)!r}")
            files.append(pattern)
            continue
        if glob.has_magic(path):
            entries = list(fs.glob(path, detail=True).values())
        else:
            try:
                entries = [fs.info(path)]
            except FileNotFoundError:
                entries = []
        matched = sorted(e["name"] for e in entries if e["type"] == "file")
        if not matched:
            raise UsageError(f"no manifest file matches {redact_url(pattern)!r}")
        files.extend(_full_name(fs, p) for p in matched)
    for file in files:
        if has_lone_surrogate(file):  # os.fsdecode keeps undecodable bytes as lone surrogates
            raise UsageError(f"manifest file name {encodable(file)!r} is not valid UTF-8: "
                             "rename the file")
    files = list(dict.fromkeys(files))
    shown: dict[str, str] = {}
    for file in files:  # keys name files without their queries: they must stay distinct
        other = shown.setdefault(redact_url(file), file)
        if other != file:
            raise UsageError(f"two manifests differ only in their URL's query or credentials "
                             f"({redact_url(file)}), which record keys leave out: give each "
                             "once")
    return files


def _full_name(fs, path: str) -> str:
    if "file" in _protocols(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def iter_manifest(file: str) -> Iterator[dict]:
    """Stream one manifest's elements (records and read failures) without loading it whole.

    One bad line or array item is one failure, and reading goes on. A file that stops being
    readable part-way (corrupt gzip, not a zip, storage error) yields one failure element at
    the next index, saying from where on it was not read.
    """
    next_index = 0
    url, file = file, redact_url(file)  # keys and messages never carry a URL's secrets
    try:
        with fsspec.open(url, "rb", compression="infer") as handle:
            if _is_json_array(file, handle):
                text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape")
                elements = _iter_json_array(file, text)  # bad bytes cost their item only
            else:
                elements = _iter_jsonl(file, handle)
            for element in elements:
                next_index = element["source"]["index"] + 1
                yield element
    except Exception as exc:  # any storage or format error costs this manifest's rest only
        if not isinstance(exc, (OSError, EOFError, zipfile.BadZipFile, zlib.error)):
            _LOG.exception("unexpected error reading %s", file)
        yield _failure_element(
            record_key(file, next_index), {"file": file, "index": next_index}, "",
            "manifest_unreadable",
            f"{file} could not be read from record {next_index} on: {type(exc).__name__}: "
            + " ".join(scrub(str(exc).replace(url, file)).split()))  # one line


def count_manifest_records(file: str) -> int:
    """How many elements ``iter_manifest`` makes of ``file``: its non-blank JSONL lines, or
    its JSON array's items (read, not decoded)."""
    with fsspec.open(file, "rb", compression="infer") as handle:
        if _is_json_array(file, handle):
            text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape")
            return sum(1 for _ in _iter_json_array(file, text))
        lines = (line.strip() for line, _ in _lines(handle))
        first = next(lines, b"").removeprefix(_BOM)
        return bool(first) + sum(1 for line in lines if line)


def _is_json_array(file: str, handle) -> bool:
    """JSONL by name (.jsonl, .ndjson), else a JSON array when the first character is '['."""
    name = (urllib.parse.urlsplit(file).path if "://" in file else file).lower()
    name = name.removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return False
    first = ""
    while not first:
        chunk = handle.read(4096)
        if not chunk:
            break
        first = chunk.lstrip(_WHITESPACE.encode() + _BOM)[:1]
    handle.seek(0)
    return first == b"["


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: json.dumps would write it as Infinity
        raise ValueError("a number too large for a float")
    return value


# Strict JSON (no NaN/Infinity, finite floats): manifests and earlier outputs alike.
JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _decode_error(exc: Exception) -> tuple[str, str]:
    """(type, message) of a value that could not be decoded."""
    if isinstance(exc, RecursionError):
        return "too_deep", "nested too deeply to decode"
    if isinstance(exc, json.JSONDecodeError):
        return "malformed_json", f"{exc.msg} at column {exc.colno}"
    return "malformed_json", str(exc)  # NaN/Infinity, 1e400, integers over 4,300 digits


def value_problem(value) -> tuple[str, str] | None:
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


def _text_element(file: str, index: int, raw: str, where: str) -> dict:
    """The element of one record's JSON text: the record, or a failure saying what is wrong."""
    source = {"file": file, "index": index}
    if has_lone_surrogate(raw):  # undecodable bytes, kept by the "surrogateescape" handler
        return _failure_element(record_key(file, index), source, raw, "bad_utf8",
                                f"{where}: not UTF-8")
    try:
        value = JSON_DECODER.decode(raw)
    except (ValueError, RecursionError) as exc:
        type_, message = _decode_error(exc)
        return _failure_element(record_key(file, index), source, raw, type_, f"{where}: {message}")
    return _record_element(file, index, value, raw, where)


def _record_element(file: str, index: int, value, raw: str, where: str) -> dict:
    source = {"file": file, "index": index}
    key = record_key(file, index)
    problem = value_problem(value)
    if problem:
        return _failure_element(key, source, raw, problem[0], f"{where}: {problem[1]}")
    if not isinstance(value, dict):
        return _failure_element(key, source, raw, "record_not_object",
                                f"{where}: record is a JSON {type(value).__name__}, not an object")
    return record_element(file, index, value)


def _failure_element(key: str, source: dict, raw: str, type_: str, message: str) -> dict:
    """A read failure; ``raw`` is capped at RAW_TEXT_LIMIT and made encodable."""
    return failure_element(key, source, CaptionError("read", type_, message),
                           raw=encodable(raw[:RAW_TEXT_LIMIT]))


def _lines(handle) -> Iterator[tuple[bytes, bool]]:
    """The lines of a binary handle, ended by \\n, \\r\\n or a lone \\r, read in chunks.

    Yields (line, True), or (its first RAW_TEXT_LIMIT bytes, False) for a line longer than
    MAX_RECORD_SIZE bytes, whose rest is skipped without being kept.
    """
    rest = b""
    skipping = False  # in the rest of a line that was too long

    def complete(lines: list[bytes]) -> Iterator[tuple[bytes, bool]]:
        nonlocal skipping
        for line in lines:
            if skipping:  # the end of the long line
                skipping = False
            else:
                yield line, True

    read = getattr(handle, "read1", handle.read)  # read1: what is there, not a full chunk
    while chunk := read(_CHUNK_BYTES):
        data = rest + chunk
        held = data.endswith(b"\r")  # maybe the first half of \r\n: decide with the next chunk
        *lines, rest = _LINE_END.split(data[:-1] if held else data)
        yield from complete(lines)
        if not skipping and len(rest) > MAX_RECORD_SIZE:
            yield rest[:RAW_TEXT_LIMIT], False
            skipping = True
        if skipping:
            rest = b""
        if held:
            rest += b"\r"
    *lines, last = _LINE_END.split(rest)
    yield from complete(lines + [last] if last else lines)


def _iter_jsonl(file: str, handle) -> Iterator[dict]:
    """Lines of a binary handle; each is decoded on its own, so one bad line loses one record."""
    for index, (line, whole) in enumerate(_lines(handle)):
        raw = line.strip().removeprefix(_BOM) if index == 0 else line.strip()
        if not raw:
            continue
        source = {"file": file, "index": index}
        where = f"line {index + 1} of {file}"
        if not whole:
            yield _failure_element(record_key(file, index), source, raw.decode("utf-8", "replace"),
                                   "record_too_large",
                                   f"{where}: longer than {MAX_RECORD_SIZE} bytes")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _failure_element(record_key(file, index), source, raw.decode("utf-8", "replace"),
                                   "bad_utf8", f"{where}: not UTF-8 ({exc.reason})")
            continue
        yield _text_element(file, index, text, where)


class _TextWindow:
    """The unread text of a handle: read on in chunks of _CHUNK_CHARS when asked, dropping what
    lies before ``pos``; ``base`` is where ``text`` starts in the whole stream."""

    def __init__(self, handle):
        self._handle = handle
        self.text = ""
        self.pos = 0
        self.base = 0
        self.eof = False

    def read_more(self) -> bool:
        """Append one chunk; False at the end of the stream."""
        chunk = self._handle.read(_CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        self.base += self.pos
        self.text = self.text[self.pos:] + chunk
        self.pos = 0
        return True

    def next_char(self) -> str:
        """The next character that is not whitespace ('' at the end); ``pos`` moves onto it."""
        while (match := _NOT_WHITESPACE.search(self.text, self.pos)) is None:
            self.pos = len(self.text)
            if not self.read_more():
                return ""
        self.pos = match.start()
        return match.group()


class _ItemScanner:
    """Finds where an array item ends: at the ',' or ']' after it on the array's own level.

    It tracks nesting of [] {} and skips quoted strings (with escapes), text fed piece by piece.
    Being for broken items, it ignores a stray '}' and, unless ``strict``, skips '...' strings
    like "..." ones (Python-style dicts).
    """

    def __init__(self, at: int, strict: bool = False):
        self._at = at  # stream position reached
        self._structure = _STRICT_STRUCTURE if strict else _STRUCTURE
        self._depth = 0
        self._quote = ""  # the quote of the string being read, "" outside strings

    def scan(self, text: str, base: int) -> int | None:
        """Read on in ``text`` (which starts at stream position ``base``); the stream position
        of the item's end, or None when ``text`` ends first."""
        pos = self._at - base
        while pos < len(text):
            if self._quote:
                match = _STRING_STOP[self._quote].search(text, pos)
                if match is None:
                    pos = len(text)
                elif match.group() == "\\":
                    pos = match.end() + 1  # past the escaped character, maybe in the next text
                else:
                    pos, self._quote = match.end(), ""
                continue
            match = self._structure.search(text, pos)
            if match is None:
                pos = len(text)
                continue
            char, pos = match.group(), match.end()
            if char in "\"'":
                self._quote = char
            elif char in "[{":
                self._depth += 1
            elif char in "]}" and self._depth:
                self._depth -= 1
            elif not self._depth and char != "}":  # ',' or ']' on the array's own level
                self._at = base + match.start()
                return self._at
        self._at = base + pos
        return None


def _iter_json_array(file: str, handle) -> Iterator[dict]:
    """Items of a top-level JSON array, decoded one at a time from a window on the text.

    A bad item is one failure and reading goes on at the next item boundary. A trailing comma
    is accepted; a missing one costs the item after it.
    """
    window = _TextWindow(handle)
    window.next_char()  # the '[' that _is_json_array saw
    window.pos += 1
    index = 0
    after_item = False
    while char := window.next_char():
        if char == "]":
            window.pos += 1
            if window.next_char():
                yield _bad_array(file, index, window.text[window.pos:window.pos + 200],
                                 "extra data after the closing ']'")
            return
        if char == "," and after_item:
            window.pos += 1
            after_item = False
            continue
        element = _read_item(window, file, index, missing_comma=after_item)
        if element is None:
            break
        yield element
        index += 1
        after_item = True
    yield _truncated_array(file, index, window.text[window.pos:].strip())


def _read_item(window: _TextWindow, file: str, index: int, missing_comma: bool) -> dict | None:
    """The element of the array item at the window's position, which moves past the item;
    None when the stream ends inside the item."""
    where = f"item {index} of {file}"
    if not missing_comma:
        element = _decode_in_place(window, file, index, where)
        if element is not None:
            return element
    end = _item_end(window)
    if end is None and window.eof:  # no ']' after it, or cut: whole or not, it is all read
        return None if missing_comma else _decode_in_place(window, file, index, where)
    if end is None:
        return _skip_long_item(window, file, index, where)
    raw = window.text[window.pos:end].strip()
    window.pos = end
    if missing_comma:
        return _failure_element(record_key(file, index), {"file": file, "index": index}, raw,
                                "malformed_json", f"{where}: expected ',' or ']' before it")
    return _text_element(file, index, raw, where)


def _decode_in_place(window: _TextWindow, file: str, index: int, where: str) -> dict | None:
    """The fast path: the element of a clean item decoded where it lies; None when it does not
    decode there (a broken item, or one cut by the window's end)."""
    while True:
        try:
            value, end = JSON_DECODER.raw_decode(window.text, window.pos)
        except (ValueError, RecursionError):
            return None
        if end < len(window.text) or not window.read_more():
            break  # else a number may go on in the next chunk: decode again
    raw = window.text[window.pos:end]
    if has_lone_surrogate(raw):
        return None  # bad UTF-8: a failure
    window.pos = end
    return _record_element(file, index, value, raw, where)


def _item_end(window: _TextWindow) -> int | None:
    """Index in the window's text where the item at its position ends (see _ItemScanner),
    reading on while the item is at most MAX_RECORD_SIZE characters; None when the stream or
    that limit ends first. When a stray apostrophe opened a '...' string that swallows the
    rest, a strict scan of the text read so far may still find the end."""
    scanner = _ItemScanner(window.base + window.pos)
    while (end := scanner.scan(window.text, window.base)) is None:
        if len(window.text) - window.pos > MAX_RECORD_SIZE or not window.read_more():
            strict = _ItemScanner(window.base + window.pos, strict=True)
            end = strict.scan(window.text, window.base)
            break
    return None if end is None else end - window.base


def _skip_long_item(window: _TextWindow, file: str, index: int, where: str) -> dict | None:
    """The failure for an item longer than MAX_RECORD_SIZE characters, once the window is past
    it (read on without keeping it); None when the stream ends inside it."""
    raw = window.text[window.pos:window.pos + RAW_TEXT_LIMIT]
    scanner = _ItemScanner(window.base + window.pos)
    while (end := scanner.scan(window.text, window.base)) is None:
        window.pos = len(window.text)
        if not window.read_more():
            return None
    window.pos = end - window.base
    return _failure_element(record_key(file, index), {"file": file, "index": index}, raw,
                            "record_too_large",
                            f"{where}: longer than {MAX_RECORD_SIZE} characters")


def _truncated_array(file: str, index: int, raw: str) -> dict:
    return _bad_array(file, index, raw, f"JSON array ends early after {index} items")


def _bad_array(file: str, index: int, raw: str, message: str) -> dict:
    return _failure_element(record_key(file, index), {"file": file, "index": index}, raw,
                            "malformed_json", f"{file}: {message}; the rest of the file is unread")
