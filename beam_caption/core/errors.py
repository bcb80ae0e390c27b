"""The error types: CaptionError for one record, UsageError and JobStopped for the whole job."""

from __future__ import annotations

import re

STAGES = ("read", "image", "request", "response")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with lone surrogates (from JSON escapes such as ``"\\ud800"``) replaced by U+FFFD.

    Python's json joins valid surrogate pairs, so a surrogate left in a str is lone, and a str
    holding one cannot be encoded as UTF-8: Beam's coders and every output file would fail.
    """
    return _LONE_SURROGATE.sub("\ufffd", text) if isinstance(text, str) else text


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (see ``encodable``)."""
    return _LONE_SURROGATE.search(text) is not None


class UsageError(ValueError):
    """A flag or input is missing or wrong: the job cannot start."""


class PreflightError(UsageError):
    """The endpoint, key or model is unusable: failing every record would only cost time."""


class JobStopped(Exception):
    """Raised by a worker to fail the whole job: going on would only turn records into failures.

    Beam reports a worker's exception inside its own message; the launcher finds ``MARKER`` there
    and prints the one line that follows it.
    """

    MARKER = "beam_caption stopped the job: "

    def __init__(self, reason: str) -> None:
        super().__init__(self.MARKER + reason)
        self.reason = reason

    def __reduce__(self):
        return (JobStopped, (self.reason,))

    @classmethod
    def find(cls, text: str) -> str | None:
        """The reason a JobStopped carried, found in an error message that quotes it."""
        _, marker, rest = text.rpartition(cls.MARKER)  # Beam may wrap it in a copy of itself
        if not marker:
            return None
        return rest.splitlines()[0].partition(" [while running")[0].rstrip(" '\"")


class StoppedError(UsageError):
    """A worker stopped the job (JobStopped); the CLI prints the reason and exits 2."""


class CaptionError(Exception):
    """A record could not be captioned.

    stage: where it failed (read | image | request | response).
    type: a short snake_case code, stable across releases, used to group failures
      in summary.json (e.g. ``image_not_found``, ``http_429``, ``malformed_response``).
    message: one human-readable line; never contains secrets.
    retryable: whether another attempt could succeed.
    attempts: how many API attempts were made (0 when none was).
    throttled_s: seconds the record waited on client-side throttling (not in the record).
    paid: what the record's answered attempts cost, ``{"prompt_tokens", "completion_tokens"[,
      "estimated": true][, "batch": true]}`` (``estimated``: some counts are the worst case
      charged for answers without usable usage; ``batch``: Batch API answers, at its price);
      None when no answer came. In the failure record as ``error.paid``.
    """

    def __init__(self, stage: str, type: str, message: str, retryable: bool = False,
                 attempts: int = 0, throttled_s: float = 0.0, paid: dict | None = None) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        message = encodable(message)
        super().__init__(f"[{stage}/{type}] {message}")
        self.stage = stage
        self.type = type
        self.message = message
        self.retryable = retryable
        self.attempts = attempts
        self.throttled_s = throttled_s
        self.paid = paid

    def __reduce__(self):
        return (CaptionError, (self.stage, self.type, self.message, self.retryable, self.attempts,
                               self.throttled_s, self.paid))

    def to_dict(self) -> dict:
        """The ``error`` object of a failure record."""
        error = {"stage": self.stage, "type": self.type, "message": self.message,
                 "attempts": self.attempts, "retryable": self.retryable}
        if self.paid:
            error["paid"] = self.paid
        return error
