"""The output contract: the elements passed between steps and the lines of the output files.

Elements stay JSON-ready dicts (they are the output lines), but every one is built here:

- a keyed record ``{"key": "FILE#INDEX", "source": {"file", "index"}, "record": {...}}``
  (``record_element``), made by ReadManifests;
- a captioned record: the input record unchanged plus the caption under ``--output_key`` (with
  ``--prompts_file``, each prompt's answer under its own key) and ``caption_meta``
  (``captioned_record``, ``CaptionMeta``);
- a failure ``{"key", "source", "record" | "raw", "error": {stage, type, message, attempts,
  retryable[, prompt][, paid]}[, "answers"]}`` (``failure_element``): with several prompts,
  ``error`` is the first failed prompt's (named by ``prompt``) and ``answers`` holds the answers
  the other prompts gave, so nothing paid for is lost; ``paid`` is what the record's answered
  attempts cost (``{"prompt_tokens", "completion_tokens"[, "estimated"]}``, errors.CaptionError).

The output tags and the metrics namespace are named here too; ``STATS`` elements are
``{"throttled_ms": N}``, one per bundle of the caption step, summed into summary.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from beam_caption.core.errors import CaptionError

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
                    raw: str | None = None, prompt: str | None = None,
                    answers: dict | None = None) -> dict:
    """A failure line: the record when it was read, else the raw text that could not be; with
    several prompts, the failed ``prompt``'s name and the other prompts' ``answers``."""
    payload = {"record": record} if record is not None else {"raw": raw or ""}
    failure = {"key": key, "source": source, **payload,
               "error": {**error.to_dict(), **({"prompt": prompt} if prompt else {})}}
    if answers:
        failure["answers"] = answers
    return failure


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
    finished_at: float  # unix time the answer came (for throughput over time)
    prompts: dict | None = None  # with several prompts: name -> that prompt's figures
    batch_id: str | None = None  # the Batch API batch that answered (--mode batch)
    # True when some token counts are the worst case charged for answers without usable usage
    # (client.worst_case_usage); the token counts cover every answered attempt (schema retries)
    usage_estimated: bool | None = None

    def to_json(self) -> dict:
        meta = dict(vars(self))  # flat values: no need for asdict's deep copy (25 us a record)
        for optional in ("prompts", "batch_id", "usage_estimated"):
            if not meta[optional]:
                del meta[optional]
        return meta


def answers_meta(model: str, key: str, fingerprint: str, answers: dict[str, Any],
                 finished_at: float, batch_id: str | None = None) -> CaptionMeta:
    """``caption_meta`` of a record's answers (prompt name -> an answer with ``attempts``,
    ``latency_ms``, ``prompt_tokens``, ``completion_tokens``, ``reasoning_tokens``,
    ``finish_reason`` and ``cached``, as client.Completion): one prompt's figures, or with
    several their totals and each one's."""
    given = list(answers.values())

    def total(field: str) -> int | None:
        values = [getattr(answer, field) for answer in given]
        return None if all(v is None for v in values) else sum(v or 0 for v in values)

    reasons = {answer.finish_reason for answer in given}
    prompts = None if len(given) == 1 else {name: {
        "attempts": answer.attempts, "latency_ms": answer.latency_ms,
        "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
        "finish_reason": answer.finish_reason, "cached": answer.cached}
        for name, answer in answers.items()}
    return CaptionMeta(
        model=model, attempts=sum(answer.attempts for answer in given),
        latency_ms=max(answer.latency_ms for answer in given),
        prompt_tokens=total("prompt_tokens"), completion_tokens=total("completion_tokens"),
        reasoning_tokens=total("reasoning_tokens"),
        finish_reason=reasons.pop() if len(reasons) == 1 else None,
        cached=all(answer.cached for answer in given), key=key, fingerprint=fingerprint,
        finished_at=round(finished_at, 3), prompts=prompts, batch_id=batch_id,
        usage_estimated=any(getattr(answer, "usage_estimated", False) for answer in given)
        or None)


def captioned_record(record: dict, answers: dict, meta: CaptionMeta) -> dict:
    """The output line of a captioned record: every input field unchanged, plus the answers
    (output key -> caption or structured value)."""
    return {**record, **answers, "caption_meta": meta.to_json()}


def caption_retries(meta: dict) -> int:
    """Attempts after the first, over a caption's prompts (``caption_meta``)."""
    per_prompt = (meta.get("prompts") or {}).values() or [meta]
    return sum(max(prompt["attempts"] - 1, 0) for prompt in per_prompt)
