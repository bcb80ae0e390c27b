"""Output file formats: their names, their fixed Parquet schema, and reading them back.

Captions, failures and set-aside captions are written (sinks.py) as

- ``jsonl``: one JSON object per line (the default);
- ``json``: a JSON array per shard, one element per line (``[``, ``{...},``, ..., ``]``), so
  the files stay line-readable (``--resume`` reads them as text);
- ``parquet``: a fixed schema (``PARQUET_COLUMNS``): the main fields as typed columns and the
  whole output line as JSON in ``line``, so no record field is lost whatever its shape;

``jsonl`` and ``json`` may be gzip-compressed (``.gz``). This module needs no Beam, so the
report and user scripts read outputs without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec

CAPTIONS_PREFIX = "captions"
FAILURES_PREFIX = "failures"
SET_ASIDE_PREFIX = "set_aside"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
SHARDS = "-*-of-*"  # matches a prefix's shard files in any format
SUFFIXES = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet"}
# One column per main field; answers (each output key) are JSON text, as their values may be
# structured. The whole output line is in ``line``.
PARQUET_COLUMNS = (
    ("key", "string"), ("image", "list<string>"), ("answers", "string"),
    ("model", "string"), ("attempts", "int64"), ("latency_ms", "double"),
    ("prompt_tokens", "int64"), ("completion_tokens", "int64"), ("finish_reason", "string"),
    ("error_stage", "string"), ("error_type", "string"), ("error_message", "string"),
    ("line", "string"),
)


def file_suffix(output_format: str, compression: str = "none") -> str:
    """The file name ending of an output format (``.jsonl``, ``.json.gz``, ``.parquet``...)."""
    return SUFFIXES[output_format] + (".gz" if compression == "gzip" else "")


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
        "image": [images] if isinstance(images, str) else
        [str(i) for i in images] if isinstance(images, list) else None,
        "answers": json.dumps(answers, ensure_ascii=False) if answers else None,
        "model": meta.get("model"), "attempts": meta.get("attempts", error.get("attempts")),
        "latency_ms": meta.get("latency_ms"), "prompt_tokens": meta.get("prompt_tokens"),
        "completion_tokens": meta.get("completion_tokens"),
        "finish_reason": meta.get("finish_reason"), "error_stage": error.get("stage"),
        "error_type": error.get("type"), "error_message": error.get("message"),
        "line": json.dumps(element, ensure_ascii=False, separators=(",", ":")),
    }


def parquet_schema():
    """The pyarrow schema of PARQUET_COLUMNS (pyarrow imported here: the parquet extra)."""
    import pyarrow as pa

    kinds = {"string": pa.string(), "int64": pa.int64(), "double": pa.float64(),
             "list<string>": pa.list_(pa.string())}
    return pa.schema([(name, kinds[kind]) for name, kind in PARQUET_COLUMNS])


def read_output_records(output_dir: str, prefix: str) -> Iterator[dict]:
    """The lines of ``OUTDIR/PREFIX-*`` in any output format, file by file, in name order
    (any fsspec URL)."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    for path in sorted(fs.glob(f"{root.rstrip('/')}/{prefix}{SHARDS}")):
        if path.endswith(".parquet"):
            yield from _parquet_lines(fs, path)
            continue
        with fs.open(path, "rt", encoding="utf-8", compression="infer") as lines:
            for line in lines:
                element = line_element(line)
                if element is not None:
                    yield element


def line_element(line: str) -> dict | None:
    """The object of one line of a jsonl or json-array output file; None for the array's
    brackets and blank lines."""
    text = line.strip().removesuffix(",")
    if text in ("", "[", "]"):
        return None
    return json.loads(text)


def _parquet_lines(fs, path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(columns=["line"]):
            for line in batch.column(0).to_pylist():
                yield json.loads(line)
