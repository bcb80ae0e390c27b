"""The VLM client: async chat completions with per-record retries, throttling and typed errors.

Requests go out through one aiohttp session per worker: the openai SDK costs about 7.5 ms
of CPU per request (it walks every message with typing introspection), which capped a
2-core worker near 130 requests/s; aiohttp costs about 1.8 ms. The SDK (``max_retries=0``)
is used only for the preflight. This module is the only retry layer, so every attempt is
counted once. Retryable: connection errors, timeouts, 408, 409, 429, 5xx and
bodies that are not a chat completion. Everything else fails the record at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass

import aiohttp
import openai
from apache_beam.io.components.util import MovingSum

from beam_caption.errors import CaptionError, PreflightError

RETRYABLE_STATUS = frozenset({408, 409, 429})
THROTTLE_WINDOW_MS = 10_000
THROTTLE_BUCKET_MS = 1_000
THROTTLE_OVERLOAD_RATIO = 2.0
THROTTLE_DELAY_S = 0.5
NO_KEY = "not-needed"  # local servers (vLLM, Ollama, llama.cpp) take any key


@dataclass(frozen=True)
class ClientSettings:
    """Where and how to call the model. Holds no secret: the key is passed separately."""

    api_url: str
    model: str
    max_concurrency: int = 32
    request_timeout: float = 120.0
    max_retries: int = 6
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    max_requests_per_minute: float | None = None
    max_tokens: int | None = None
    temperature: float | None = None

    def sampling_params(self) -> dict:
        """The optional request parameters that are set."""
        return {k: v for k, v in (("max_tokens", self.max_tokens),
                                  ("temperature", self.temperature)) if v is not None}


@dataclass
class Completion:
    """A caption and what it cost."""

    caption: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    latency_ms: float
    throttled_s: float = 0.0
    cached: bool = False


class OverloadThrottle:
    """Client-side adaptive throttling (the SRE book's formula, as in Beam's AdaptiveThrottler).

    Over a sliding window, a new request is delayed with probability
    ``max(0, (attempts - ratio * accepted) / (attempts + 1))``. Unlike Beam's class, an
    attempt is counted when its answer arrives, not when it starts: with many requests in
    flight, counting at the start would throttle every client while it warms up.
    """

    def __init__(self, rng: random.Random, window_ms: int = THROTTLE_WINDOW_MS,
                 bucket_ms: int = THROTTLE_BUCKET_MS, ratio: float = THROTTLE_OVERLOAD_RATIO):
        self._attempts = MovingSum(window_ms, bucket_ms)
        self._accepted = MovingSum(window_ms, bucket_ms)
        self._ratio = ratio
        self._rng = rng

    def record(self, overloaded: bool) -> None:
        now = _now_ms()
        self._attempts.add(now, 1)
        if not overloaded:
            self._accepted.add(now, 1)

    def should_wait(self) -> bool:
        now = _now_ms()
        if not self._attempts.has_data(now):
            return False
        attempts = self._attempts.sum(now)
        rejection = (attempts - self._ratio * self._accepted.sum(now)) / (attempts + 1)
        return self._rng.random() < rejection


class _RequestSpacer:
    """Spaces request starts so that at most ``per_minute`` begin in any minute."""

    def __init__(self, per_minute: float):
        self._interval = 60.0 / per_minute
        self._next = 0.0

    async def wait(self) -> float:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)
        return start - now


def backoff_delay(retry: int, settings: ClientSettings, retry_after: float | None,
                  rng: random.Random) -> float:
    """Full-jitter exponential backoff, at least the server's Retry-After, at most max_backoff."""
    ceiling = min(settings.max_backoff, settings.initial_backoff * 2 ** retry)
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, settings.max_backoff)


def retry_after_seconds(headers) -> float | None:
    """Seconds asked for by ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HTTPStatusFailure(Exception):
    """A non-2xx answer: its status, headers (for Retry-After) and JSON error body if any."""

    def __init__(self, status: int, headers, body: bytes):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        try:
            self.body = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self.body = body[:500].decode("utf-8", "replace")

    @property
    def overloaded(self) -> bool:
        return self.status in (429, 503)


def classify_exception(exc: BaseException) -> CaptionError:
    """Map a transport exception or HTTP failure to a typed CaptionError."""
    if isinstance(exc, CaptionError):
        return exc
    if isinstance(exc, TimeoutError):
        return CaptionError("request", "timeout", "the request timed out", retryable=True)
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return CaptionError("request", "connection_error",
                            f"connection failed: {type(exc).__name__}", retryable=True)
    if isinstance(exc, HTTPStatusFailure):
        status = exc.status
        code = _error_code(exc.body)
        retryable = status in RETRYABLE_STATUS or status >= 500
        type_ = "content_policy" if code == "content_policy_violation" else f"http_{status}"
        return CaptionError("request", type_, f"HTTP {status}: {_error_message(exc.body)}",
                            retryable=retryable)
    return CaptionError("request", "client_error", f"{type(exc).__name__}: {exc}")


def _error_code(body) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return error["code"]
    return None


def _error_message(body) -> str:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
    return str(body)[:500]


def parse_completion(body: bytes) -> tuple[str, str | None, int | None, int | None]:
    """(caption, finish_reason, prompt_tokens, completion_tokens) from a response body.

    Raises a retryable CaptionError(stage="response") for anything that is not a chat
    completion with a non-empty text answer.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        kind = "empty_response" if not body.strip() else "malformed_response"
        raise CaptionError("response", kind, "the response body is not JSON",
                           retryable=True) from None
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise CaptionError("response", "not_a_completion",
                           "the response is not a chat completion", retryable=True) from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise CaptionError("response", "empty_caption", "the model returned no text",
                           retryable=True)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return (content.strip(), choice.get("finish_reason"), usage.get("prompt_tokens"),
            usage.get("completion_tokens"))


class VLMClient:
    """One per worker process, used from one event loop.

    ``complete()`` runs one record's request with its own retries; at most
    ``max_concurrency`` requests are on the wire at once; backoff waits hold no slot.
    """

    def __init__(self, settings: ClientSettings, api_key: str | None, seed: int | None = None):
        self.settings = settings
        self._url = settings.api_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key or NO_KEY}",
                         "Content-Type": "application/json"}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.max_concurrency),
            timeout=aiohttp.ClientTimeout(total=None), raise_for_status=False)
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._rng = random.Random(seed)
        self._throttle = OverloadThrottle(self._rng)
        self._spacer = (_RequestSpacer(settings.max_requests_per_minute)
                        if settings.max_requests_per_minute else None)
        self._extra = settings.sampling_params()

    async def complete(self, messages: list[dict]) -> Completion:
        """Caption one request, retrying retryable failures; raises CaptionError when done."""
        throttled = 0.0
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            throttled += await self._wait_for_turn()
            try:
                caption, finish, prompt_tokens, completion_tokens = await self._attempt(messages)
            except Exception as exc:  # every failure becomes a typed error below
                error = classify_exception(exc)
                error.attempts = attempt
                error.throttled_s = round(throttled, 3)
                failure = exc if isinstance(exc, HTTPStatusFailure) else None
                self._throttle.record(overloaded=bool(failure and failure.overloaded))
                if not error.retryable or attempt > self.settings.max_retries:
                    raise error from None
                headers = failure.headers if failure else None
                await asyncio.sleep(backoff_delay(attempt - 1, self.settings,
                                                  retry_after_seconds(headers), self._rng))
                continue
            self._throttle.record(overloaded=False)
            return Completion(caption, finish, prompt_tokens, completion_tokens, attempt,
                              round((time.monotonic() - started) * 1000, 1), round(throttled, 3))

    async def _wait_for_turn(self) -> float:
        """Client-side throttling: adaptive (after overload answers) and the optional RPM cap."""
        waited = 0.0
        while self._throttle.should_wait():
            delay = THROTTLE_DELAY_S * (0.5 + self._rng.random())
            await asyncio.sleep(delay)
            waited += delay
        if self._spacer is not None:
            waited += await self._spacer.wait()
        return waited

    async def _attempt(self, messages: list[dict]):
        payload = json.dumps({"model": self.settings.model, "messages": messages, **self._extra})
        async with self._slots:
            async with asyncio.timeout(self.settings.request_timeout):
                async with self._session.post(self._url, data=payload,
                                              headers=self._headers) as response:
                    body = await response.read()
                    if response.status >= 400:
                        raise HTTPStatusFailure(response.status, response.headers, body)
        return parse_completion(body)

    async def aclose(self) -> None:
        await self._session.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


PREFLIGHT_TIMEOUT_S = 15.0


def preflight(settings: ClientSettings, api_key: str | None) -> None:
    """Check endpoint, key and model before the job starts; raise PreflightError if unusable.

    Lists the models; where the server has no model list (404/405) it sends one tiny
    text-only chat request instead.
    """
    client = _preflight_client(settings, api_key)
    try:
        served = [model.id for model in client.models.list()]
    except openai.APIStatusError as exc:
        if exc.status_code not in (404, 405):
            raise _preflight_error(settings, exc) from None
        served = None
    except openai.APIError as exc:
        raise _preflight_error(settings, exc) from None
    finally:
        client.close()
    if served is None:
        _probe_chat(settings, api_key)
    elif served and settings.model not in served:
        shown = ", ".join(sorted(served)[:10])
        raise PreflightError(f"model {settings.model!r} is not served at {settings.api_url} "
                             f"(it serves: {shown})")


def _preflight_client(settings: ClientSettings, api_key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=settings.api_url, api_key=api_key or NO_KEY, max_retries=0,
                         timeout=PREFLIGHT_TIMEOUT_S)


def _probe_chat(settings: ClientSettings, api_key: str | None) -> None:
    client = _preflight_client(settings, api_key)
    try:
        client.chat.completions.create(model=settings.model, max_tokens=1,
                                       messages=[{"role": "user", "content": "ping"}])
    except openai.APIStatusError as exc:
        if exc.status_code in (401, 403, 404):
            raise _preflight_error(settings, exc) from None
    except openai.APIError as exc:
        raise _preflight_error(settings, exc) from None
    finally:
        client.close()


def _preflight_error(settings: ClientSettings, exc: openai.APIError) -> PreflightError:
    where = settings.api_url
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 401:
            return PreflightError(f"{where} refused the API key (HTTP 401): set DF_API_KEY or "
                                  "OPENAI_API_KEY, or name the variable with --api_key_env")
        if status == 403:
            return PreflightError(f"{where} denied access (HTTP 403): the key may lack access "
                                  f"to model {settings.model!r}")
        if status == 404:
            return PreflightError(f"model {settings.model!r} was not found at {where} (HTTP 404)")
        return PreflightError(f"{where} answered HTTP {status}: {_error_message(exc)}")
    if isinstance(exc, openai.APITimeoutError):
        return PreflightError(f"{where} did not answer within {PREFLIGHT_TIMEOUT_S:.0f} s")
    cause = exc.__cause__ or exc
    return PreflightError(f"cannot reach {where}: {type(cause).__name__}: {cause}")
