"""The output contract: the elements passed between steps and the lines of the output files.

Elements stay JSON-ready dicts (they are the output lines), but every one is built here:

- a keyed record ``{"key": "FILE#INDEX", "source": {"file", "index"}, "record": {...}}``
  (``record_element``), made by ReadManifests;
- a captioned record: the input record unchanged plus the caption under ``--output_key`` and
  ``caption_meta`` (``captioned_record``, ``CaptionMeta``);
- a failure ``{"key", "source", "record" | "raw", "error": {stage, type, message, attempts,
  retryable}}`` (``failure_element``).

The output tags and the metrics namespace are named here too; ``STATS`` elements are
``{"throttled_ms": N}``, one per bundle of the caption step, summed into summary.json.
"""

from __future__ import annotations

import dataclasses

from beam_caption.errors import CaptionError

CAPTIONS = "captions"
FAILURES = "failures"
RECORDS = "records"
STATS = "stats"  # per-bundle figures of the caption step for summary.json (not an output file)
METRICS_NAMESPACE = "beam_caption"


def record_key(file: str, index: int) -> str:
    """A record's place: ``FILE#INDEX`` (INDEX = line or array item, from 0)."""
    return f"{file}#{index}"


def record_element(file: str, index: int, record: dict) -> dict:
    """A keyed record as ReadManifests emits it."""
    return {"key": record_key(file, index), "source": {"file": file, "index": index},
            "record": record}


def failure_element(key: str, source: dict, error: CaptionError, *, record: dict | None = None,
                    raw: str | None = None) -> dict:
    """A failure line: the record when it was read, else the raw text that could not be."""
    payload = {"record": record} if record is not None else {"raw": raw or ""}
    return {"key": key, "source": source, **payload, "error": error.to_dict()}


@dataclasses.dataclass(frozen=True)
class CaptionMeta:
    """``caption_meta`` of a captioned record: how the caption was made and what it cost."""

    model: str
    attempts: int
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    reasoning_tokens: int | None
    finish_reason: str | None
    cached: bool
    key: str
    fingerprint: str

    def to_json(self) -> dict:
        return dict(vars(self))  # flat values: no need for asdict's deep copy (25 us a record)


def captioned_record(record: dict, output_key: str, caption: str, meta: CaptionMeta) -> dict:
    """The output line of a captioned record: every input field unchanged, plus the caption."""
    return {**record, output_key: caption, "caption_meta": meta.to_json()}
