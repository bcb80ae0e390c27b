"""The one error type every stage raises, and the failure record built from it."""

from __future__ import annotations

STAGES = ("read", "image", "request", "response")


class UsageError(ValueError):
    """A flag or input is missing or wrong: the job cannot start."""


class PreflightError(UsageError):
    """The endpoint, key or model is unusable: failing every record would only cost time."""


class CaptionError(Exception):
    """A record could not be captioned.

    stage: where it failed (read | image | request | response).
    type: a short snake_case code, stable across releases, used to group failures
      in summary.json (e.g. ``image_not_found``, ``http_429``, ``malformed_response``).
    message: one human-readable line; never contains secrets.
    retryable: whether another attempt could succeed.
    attempts: how many API attempts were made (0 when none was).
    throttled_s: seconds the record waited on client-side throttling (not in the record).
    """

    def __init__(self, stage: str, type: str, message: str, retryable: bool = False,
                 attempts: int = 0, throttled_s: float = 0.0) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        super().__init__(f"[{stage}/{type}] {message}")
        self.stage = stage
        self.type = type
        self.message = message
        self.retryable = retryable
        self.attempts = attempts
        self.throttled_s = throttled_s

    def __reduce__(self):
        return (CaptionError, (self.stage, self.type, self.message, self.retryable, self.attempts,
                               self.throttled_s))

    def to_dict(self) -> dict:
        """The ``error`` object of a failure record."""
        return {"stage": self.stage, "type": self.type, "message": self.message,
                "attempts": self.attempts, "retryable": self.retryable}
