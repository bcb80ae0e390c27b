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
  attempts cost (``{"prompt_tokens", "completion_tokens"[, "estimated"][, "by_model"]}``,
  errors.CaptionError; ``by_model`` when prompts asked other models, core/stages.py).

``record_outcome`` is the one way a record's answers become its captioned record or its
failure, online (core/engine.py) and from Batch API results (transforms/batch.py) alike.
A record that comes from no manifest (a library user's own PCollection) is keyed by
``keyed_record``: by a field it holds, or by its content.

The output tags and the metrics namespace are named here too; ``STATS`` elements are
``{"throttled_ms": N}``, one per bundle of the caption step, summed into summary.json.

Asked to (``--copy_images``, for ``--output_format webdataset``), a captioned record carries its
images' bytes to the sink in the private field ``IMAGE_BYTES`` (a list of bytes): the caption
step marks the element it submits (``keeping_images``), the runtime fills the mark with the
bytes it read or was given, and ``record_outcome`` moves them onto the caption. No output line
holds them (``without_image_bytes``), and a failure never carries them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from beam_caption.core.errors import CaptionError
from beam_caption.core.identity import element_fingerprint, record_fingerprint

if TYPE_CHECKING:
    from beam_caption.core.client import Completion
    from beam_caption.core.prompts import PromptSpec

CAPTIONS = "captions"
FAILURES = "failures"
RECORDS = "records"
STATS = "stats"  # per-bundle figures of the caption step for summary.json (not an output file)
METRICS_NAMESPACE = "beam_caption"
IMAGE_BYTES = "__image_bytes__"  # a caption's carried image bytes (--copy_images), never written


def record_key(file: str, index: int) -> str:
    """A record's place: ``FILE#INDEX`` (INDEX = line or array item, from 0)."""
    return f"{file}#{index}"


def record_element(file: str, index: int, record: dict) -> dict:
    """A keyed record as ReadManifests emits it."""
    return {"key": record_key(file, index), "source": {"file": file, "index": index},
            "record": record}


def _is_record_element(value: object) -> bool:
    """Whether ``value`` is a keyed record (``record_element``'s shape, exactly)."""
    return (isinstance(value, dict)
            and value.keys() - {"images"} == {"key", "source", "record"}
            and isinstance(value["key"], str) and isinstance(value["source"], dict)
            and isinstance(value["record"], dict))


def content_key(record: dict) -> str:
    """A record's key from its content alone: ``sha256:`` and 16 hex digits, the same for
    equal records in every run."""
    return "sha256:" + record_fingerprint(record, "")[:16]


def keyed_record(value: object, key_field: str | None = None) -> dict:
    """A keyed record (``record_element``'s shape) of a record from anywhere, or the failure
    of a value that cannot be one.

    A keyed record is kept as it is. A plain record dict is keyed by its ``key_field`` (the
    field's value as text) when one is named, else by its content (``content_key``); its
    ``source`` names the field (``{"key_field": NAME}``), or is empty. A value that is not a
    dict, or lacks ``key_field``, is a read failure.
    """
    if _is_record_element(value):
        return value  # type: ignore[return-value]
    if not isinstance(value, dict):
        raw = repr(value)[:1000]
        return failure_element(content_key({"raw": raw}), {}, CaptionError(
            "read", "not_a_record", f"expected a record dict, got {type(value).__name__}"),
            raw=raw)
    source = {"key_field": key_field} if key_field else {}
    if key_field is None:
        return {"key": content_key(value), "source": source, "record": value}
    if key_field not in value:
        return failure_element(content_key(value), source, CaptionError(
            "read", "missing_key_field", f"record has no {key_field!r} field (key_field)"),
            record=value)
    return {"key": str(value[key_field]), "source": source, "record": value}


def keeping_images(element: dict) -> dict:
    """A keyed record marked for its image bytes to travel with its caption: a copy (the
    input element is left as it was) whose ``IMAGE_BYTES`` the runtime fills."""
    return {**element, IMAGE_BYTES: []}


def carried_images(element: dict) -> list[bytes]:
    """The image bytes ``element`` carries (none: an empty list; a field of that name that is
    not a list of bytes, as JSON could hold, carries none)."""
    images = element.get(IMAGE_BYTES)
    if isinstance(images, list) and all(isinstance(data, bytes) for data in images):
        return images
    return []


def without_image_bytes(element: dict) -> dict:
    """``element`` without carried image bytes: what an output line holds."""
    if IMAGE_BYTES not in element:
        return element
    return {name: value for name, value in element.items() if name != IMAGE_BYTES}


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
    # answers an answer check refused before the kept ones, by type (degenerate, refusal...)
    rejected: dict[str, int] | None = None
    # a judge's verdict (core/stages.quality_meta): score, threshold, re-caption and the first
    # answer it replaced
    quality: dict | None = None
    # with prompts asked of other models: model -> {"prompt_tokens", "completion_tokens"} paid
    tokens_by_model: dict | None = None
    # of prompt_tokens, those the server served from its prefix cache (None: not reported)
    cached_tokens: int | None = None

    def to_json(self) -> dict:
        meta = dict(vars(self))  # flat values: no need for asdict's deep copy (25 us a record)
        for optional in ("prompts", "batch_id", "usage_estimated", "rejected", "quality",
                         "tokens_by_model", "cached_tokens"):
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
    rejected = Counter(kind for answer in given
                       for kind in getattr(answer, "rejected_answers", ()))
    prompts = None if len(given) == 1 else {name: {
        "attempts": answer.attempts, "latency_ms": answer.latency_ms,
        "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
        "finish_reason": answer.finish_reason, "cached": answer.cached,
        **({"cached_tokens": answer.cached_tokens} if answer.cached_tokens else {})}
        for name, answer in answers.items()}
    return CaptionMeta(
        model=model, attempts=sum(answer.attempts for answer in given),
        latency_ms=max(answer.latency_ms for answer in given),
        prompt_tokens=total("prompt_tokens"), completion_tokens=total("completion_tokens"),
        reasoning_tokens=total("reasoning_tokens"), cached_tokens=total("cached_tokens"),
        finish_reason=reasons.pop() if len(reasons) == 1 else None,
        cached=all(answer.cached for answer in given), key=key, fingerprint=fingerprint,
        finished_at=round(finished_at, 3), prompts=prompts, batch_id=batch_id,
        usage_estimated=any(getattr(answer, "usage_estimated", False) for answer in given)
        or None, rejected=dict(sorted(rejected.items())) or None)


class Outcome(NamedTuple):
    """What became of one record: a captioned record or a failure, and what it took."""

    caption: dict | None
    failure: dict | None
    attempts: int
    throttled_s: float


def failed_outcome(element: dict, error: CaptionError, prompt: str | None = None,
                   answers: dict | None = None) -> Outcome:
    """The Outcome of a keyed record that failed with ``error`` (``failure_element``)."""
    return Outcome(None, failure_element(element["key"], element["source"], error,
                                         record=element["record"], prompt=prompt,
                                         answers=answers), error.attempts, error.throttled_s)


def record_outcome(element: dict, specs: Sequence[PromptSpec],
                   answers: Sequence[Completion | CaptionError], *, model: str,
                   settings_digest: str, finished_at: float,
                   batch_id: str | None = None, quality: dict | None = None,
                   tokens_by_model: dict | None = None) -> Outcome:
    """A keyed record's answers as its captioned record or its failure: the one place the
    online and the batch paths turn answers into an output line.

    Args:
        element: the keyed record (``record_element``).
        specs: the prompts asked (``WorkerConfig.prompt_specs``).
        answers: each prompt's answer (a Completion) or why it has none, in ``specs`` order.
        model: the model named in ``caption_meta``.
        settings_digest: the run's ``WorkerConfig.settings_digest`` (``caption_meta``'s
            fingerprint).
        finished_at: unix time the last answer came.
        batch_id: the Batch API batch that answered: named in ``caption_meta``; a failure's
            paid tokens are at the batch price.
        quality: a judge's verdict, ``caption_meta["quality"]`` (core/stages.py).
        tokens_by_model: the tokens each model was paid, when prompts were asked of models
            other than ``model``: ``caption_meta["tokens_by_model"]``, a failure's
            ``error.paid["by_model"]``.

    Returns:
        The captioned record (every prompt answered), else the failure of the first failed
        prompt, its message naming the other failed prompts, with the answers the others gave
        and what all of them paid.
    """
    attempts = sum(answer.attempts for answer in answers)
    throttled = sum(answer.throttled_s for answer in answers)
    done = {spec.output_key: answer.caption for spec, answer in zip(specs, answers, strict=True)
            if not isinstance(answer, CaptionError)}
    failed = [(spec, answer) for spec, answer in zip(specs, answers, strict=True)
              if isinstance(answer, CaptionError)]
    if failed:
        spec, first = failed[0]
        message = first.message
        if len(failed) > 1:
            message += " (also failed: " + ", ".join(other.name for other, _ in failed[1:]) + ")"
        paid = paid_by(answers)
        if paid and batch_id is not None:
            paid["batch"] = True
        if paid and tokens_by_model:
            paid["by_model"] = tokens_by_model
        error = CaptionError(first.stage, first.type, message, first.retryable, first.attempts,
                             first.throttled_s, paid)
        outcome = failed_outcome(element, error, spec.name if len(specs) > 1 else None, done)
        return outcome._replace(attempts=attempts, throttled_s=throttled)
    meta = answers_meta(model, element["key"],
                        element_fingerprint(element, settings_digest),
                        {spec.name: answer for spec, answer in zip(specs, answers, strict=True)},
                        finished_at, batch_id)
    if quality or tokens_by_model:
        meta = dataclasses.replace(meta, quality=quality, tokens_by_model=tokens_by_model)
    caption = captioned_record(element["record"], done, meta)
    if element.get(IMAGE_BYTES):  # filled by the runtime for a record marked keeping_images
        caption[IMAGE_BYTES] = element[IMAGE_BYTES]
    return Outcome(caption, None, attempts, throttled)


def paid_by(answers: Sequence[Completion | CaptionError]) -> dict | None:
    """What a record's prompts paid (``CaptionError.paid``): the answers kept (cached answers
    cost nothing) and the failed prompts' paid attempts; None when nothing was paid."""
    prompt_tokens = completion_tokens = cached_tokens = 0
    estimated = False
    for answer in answers:
        if isinstance(answer, CaptionError):
            if answer.paid:
                prompt_tokens += answer.paid["prompt_tokens"]
                completion_tokens += answer.paid["completion_tokens"]
                cached_tokens += answer.paid.get("cached_tokens", 0)
                estimated = estimated or bool(answer.paid.get("estimated"))
        elif not answer.cached:
            prompt_tokens += answer.prompt_tokens or 0
            completion_tokens += answer.completion_tokens or 0
            cached_tokens += answer.cached_tokens or 0
            estimated = estimated or answer.usage_estimated
    if not (prompt_tokens or completion_tokens):
        return None
    paid = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            **({"cached_tokens": cached_tokens} if cached_tokens else {})}
    return {**paid, "estimated": True} if estimated else paid


def captioned_record(record: dict, answers: dict, meta: CaptionMeta) -> dict:
    """The output line of a captioned record: every input field unchanged, plus the answers
    (output key -> caption or structured value)."""
    return {**record, **answers, "caption_meta": meta.to_json()}


def caption_retries(meta: dict) -> int:
    """Attempts after the first, over a caption's prompts (``caption_meta``)."""
    per_prompt = (meta.get("prompts") or {}).values() or [meta]
    return sum(max(prompt["attempts"] - 1, 0) for prompt in per_prompt)
