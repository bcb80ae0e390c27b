"""Preflight: check endpoint, key and model once, in the launcher, before the job starts.

Uses the openai SDK (``max_retries=0``) for its typed errors; workers never import this module.
Transient answers (408, 409, 429, 5xx, connection errors, timeouts) are retried by
``_Check.send`` alone, at most PREFLIGHT_MAX_ATTEMPTS times per request and never past
PREFLIGHT_DEADLINE_S for the whole check. Every message is one line, with the key scrubbed and
the URL's credentials redacted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam

from beam_caption.core.client import (
    NO_KEY,
    RETRYABLE_STATUS,
    ClientSettings,
    error_message,
    retry_after_seconds,
)
from beam_caption.core.errors import PreflightError, encodable
from beam_caption.core.redact import clean_key, scrub

PREFLIGHT_TIMEOUT_S = 15.0  # one request
PREFLIGHT_MAX_ATTEMPTS = 4  # per request, the first included
PREFLIGHT_DEADLINE_S = 60.0  # the whole check, waits included: no retry may end past it
PREFLIGHT_BACKOFF_S = 1.0  # wait before the first retry when the server names none; doubles
NO_MODEL_LIST_STATUS = (404, 405)
KEY_REFUSED_STATUS = (401, 403)
MODEL_NOT_FOUND_CODE = "model_not_found"
SHOWN_MODELS = 10
PROBE_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "ping"}]


def preflight(settings: ClientSettings, api_key: str | None) -> None:
    """Check endpoint, key and model before the job starts; raise PreflightError if unusable.

    Lists the models; where the server has no model list (404/405), or its list lacks the
    model, it asks the model for one token (text only) instead.
    """
    api_key = clean_key(api_key)
    _check_key(api_key)
    check = _Check(settings, api_key)
    try:
        check.run()
    finally:
        check.client.close()


def _check_key(api_key: str | None) -> None:
    """Refuse a key that no HTTP header can carry (the error would otherwise quote it)."""
    if api_key and not (api_key.isascii() and api_key.isprintable()):
        raise PreflightError("the API key holds a line break, control or non-ASCII character, "
                             "which an HTTP header cannot carry: check its variable's value")


class _Check:
    """One preflight: its SDK client, the key to scrub from messages, and its deadline."""

    def __init__(self, settings: ClientSettings, api_key: str | None):
        self.settings = settings
        self.secrets = (api_key,) if api_key else ()
        self.where = settings.api_url  # its credentials and query are redacted by _failure
        self.client = openai.OpenAI(base_url=settings.api_url, api_key=api_key or NO_KEY,
                                    max_retries=0, timeout=PREFLIGHT_TIMEOUT_S)
        self.deadline = time.monotonic() + PREFLIGHT_DEADLINE_S

    def run(self) -> None:
        model = self.settings.model
        served = self.served_models()
        if served is None:
            self.probe_model()
        elif model not in served:
            shown = ", ".join(sorted(served)[:SHOWN_MODELS]) or "no model"
            self.probe_model(f"model {model!r} is not served at {self.where} "
                             f"(it serves: {shown})")

    def served_models(self) -> list[str] | None:
        """The model ids the server lists; None where it has no list (404/405)."""
        try:
            response = self.send(self.client.models.with_raw_response.list)
        except openai.APIStatusError as exc:
            if exc.status_code in NO_MODEL_LIST_STATUS:
                return None
            raise self.error(exc) from None
        served = _model_ids(response.content)
        if served is None:
            raise self.fail(f"{self.where} did not answer like an OpenAI-compatible API "
                            f"(GET /models returned {_body_kind(response)}); "
                            "check --api_url ends in /v1")
        return served

    def probe_model(self, refusal: str | None = None) -> None:
        """Ask the model for one token; where the server does not know it, raise PreflightError
        with ``refusal`` (None: the server's answer). Another 4xx is about the request, not the
        model, so the model is accepted."""
        if self.room() < 0:
            raise self.fail(f"{self.where} answered too slowly to check model "
                            f"{self.settings.model!r} within the preflight's "
                            f"{PREFLIGHT_DEADLINE_S:g} s limit")
        try:
            self.send(lambda: self.client.chat.completions.with_raw_response.create(
                model=self.settings.model, max_tokens=1, messages=PROBE_MESSAGES))
        except openai.APIStatusError as exc:
            unknown = exc.status_code == 404 or _names_the_model(exc)
            if unknown and refusal:
                raise self.fail(refusal) from None
            if unknown or exc.status_code in KEY_REFUSED_STATUS:
                raise self.error(exc) from None

    def send(self, request: Callable[[], Any]) -> httpx2.Response:
        """The answer to ``request`` (an SDK ``with_raw_response`` call), transient failures
        retried; raises PreflightError when they outlast the ceilings, and
        openai.APIStatusError for any other error answer."""
        attempt = 1
        while True:
            try:
                return request().http_response
            except openai.APIError as exc:
                if not _transient(exc):
                    raise
                self.wait_to_retry(exc, attempt)
            attempt += 1

    def wait_to_retry(self, exc: openai.APIError, attempt: int) -> None:
        """Sleep before retrying ``exc``, as long as the server asks or else with exponential
        backoff; raise PreflightError where the attempts or the deadline do not allow it."""
        if attempt >= PREFLIGHT_MAX_ATTEMPTS:
            raise self.error(exc, f" (after {attempt} attempts)")
        asked = (retry_after_seconds(exc.response.headers)
                 if isinstance(exc, openai.APIStatusError) else None)
        delay = PREFLIGHT_BACKOFF_S * 2 ** (attempt - 1) if asked is None else asked
        if asked is not None and asked > self.room():
            raise self.error(exc, f"; it asked to wait {round(asked, 1):g} s before retrying, "
                                  f"more than the preflight's {PREFLIGHT_DEADLINE_S:g} s limit "
                                  "allows: try again later or pass --skip_preflight")
        if delay > self.room():
            raise self.error(exc, f" (after {attempt} attempts, near the preflight's "
                                  f"{PREFLIGHT_DEADLINE_S:g} s limit)")
        time.sleep(delay)

    def room(self) -> float:
        """Seconds a request may still wait and yet end, timed out or not, by the deadline."""
        return self.deadline - time.monotonic() - PREFLIGHT_TIMEOUT_S

    def error(self, exc: openai.APIError, suffix: str = "") -> PreflightError:
        return _preflight_error(self.settings, exc, self.secrets, suffix)

    def fail(self, message: str) -> PreflightError:
        return _failure(message, self.secrets)


def _transient(exc: openai.APIError) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)  # timeouts included


def _names_the_model(exc: openai.APIStatusError) -> bool:
    """Whether an error answer says the model is unknown (some servers answer 400 for it)."""
    return exc.code == MODEL_NOT_FOUND_CODE or exc.param == "model"


def _model_ids(body: bytes) -> list[str] | None:
    """The ids of an OpenAI model list; None for any other body."""
    try:
        ids = [model["id"] for model in json.loads(body)["data"]]
    except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
        return None
    return ids if all(isinstance(model_id, str) for model_id in ids) else None


def _body_kind(response: httpx2.Response) -> str:
    """What an answer that is not a model list holds, for a message."""
    content_type = response.headers.get("content-type", "").partition(";")[0].strip()
    if not content_type:
        return "a body without a content type"
    if content_type.endswith("json"):
        return f"{content_type} that is not a model list"
    return content_type


def _preflight_error(settings: ClientSettings, exc: openai.APIError,
                     secrets: tuple[str, ...] = (), suffix: str = "") -> PreflightError:
    """The PreflightError for an SDK error, ``suffix`` appended, scrubbed of ``secrets``."""
    return _failure(_describe(settings, exc) + suffix, secrets)


def _describe(settings: ClientSettings, exc: openai.APIError) -> str:
    where = settings.api_url
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 401:
            return (f"{where} refused the API key (HTTP 401): set DF_API_KEY or "
                    "OPENAI_API_KEY, or name the variable with --api_key_env")
        if status == 403:
            return (f"{where} denied access (HTTP 403): the key may lack access "
                    f"to model {settings.model!r}")
        if status == 404:
            return f"model {settings.model!r} was not found at {where} (HTTP 404)"
        return f"{where} answered HTTP {status}: {error_message(exc.body)}"
    if isinstance(exc, openai.APITimeoutError):
        return f"{where} did not answer within {PREFLIGHT_TIMEOUT_S:g} s"
    cause = exc.__cause__ or exc
    return f"cannot reach {where}: {type(cause).__name__}: {cause}"


def _failure(message: str, secrets: tuple[str, ...]) -> PreflightError:
    """A PreflightError of one line, without secrets, bearer tokens, or URL credentials and
    queries (scrub applies redact_url to each URL, the API URL's included: exactly once, as a
    redacted URL does not parse again)."""
    return PreflightError(" ".join(encodable(scrub(message, secrets)).split()))
