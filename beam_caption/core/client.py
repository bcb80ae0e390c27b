"""The VLM client: async chat completions with per-record retries, throttling and typed errors.

Requests go out through one aiohttp session per worker: the openai SDK costs about 7.5 ms
of CPU per request (it walks every message with typing introspection), which capped a
2-core worker near 130 requests/s; aiohttp costs about 1.8 ms. The SDK is used only by the
launcher's preflight (``cli/preflight.py``), so workers never import it. This module is the only
retry layer, so every attempt is counted once. Retryable: connection errors, timeouts, 408,
409, 429, 5xx and bodies that are not a chat completion. Everything else fails the record at
once. Answers are untrusted: bodies and captions are capped, token counts checked, text made
encodable and scrubbed of the key. A run of consecutive 401/403/404 answers stops the job
(``JobStopped``) instead of failing every remaining record. Requests are paced to the job's
and the account's rate limits (ratelimit.py); every wait a server asks for is bounded there
(``server_wait``).

Every answer that comes is paid, whatever becomes of its record: its usage is read
(``usage_counts``, the one check of a usage block) before the answer is judged, counted in the
budget (``--max_cost``: a ``CostBudget``, which the process's clients of every model share)
and carried by what the record becomes: a Completion's token counts
cover all its answered attempts (schema retries too), a CaptionError's ``paid`` what its
attempts cost. An answer without usable counts (no usage, strings, negative, absurd) is charged
a worst case, ``worst_case_usage``, with one warning per process. The prompt tokens a server
served from its prefix cache (``usage.prompt_tokens_details.cached_tokens``) are priced at
``price_per_million_cached_input_tokens`` (``ClientSettings.cost``). Once the budget is spent
nothing new is sent (attempts that were waiting raise JobStopped at once); requests already
sent finish, and the caption step keeps their answers before it stops the job.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp

from beam_caption.core.budget import CostBudget
from beam_caption.core.errors import CaptionError, JobStopped, encodable
from beam_caption.core.ratelimit import JobRateLimiter, Ticket, retry_after_seconds, server_wait
from beam_caption.core.redact import redact_url, scrub
from beam_caption.core.request import AcceptedParams, build_body, params_head, refused_param
from beam_caption.core.tokens import DEFAULT_COMPLETION_TOKENS

RETRYABLE_STATUS = frozenset({408, 409, 429})
SYSTEMIC_STATUS = {401: "the API key was refused", 403: "access was denied",
                   404: "the model or endpoint was not found"}
MAX_TOKEN_COUNT = 10**9  # a usage count above this is not a count
ERROR_BODY_BYTES = 64 * 1024  # of an error answer, only this much is read for its message
THROTTLE_WINDOW_MS = 10_000
THROTTLE_BUCKET_MS = 1_000
THROTTLE_OVERLOAD_RATIO = 2.0
THROTTLE_DELAY_S = 0.5
NO_KEY = "not-needed"  # local servers (vLLM, Ollama, llama.cpp) take any key
# Never dropped on a refusal: a refused response_format is a wrong schema of one prompt (its
# records fail), not a server that lacks the parameter; dropping it would turn structured
# output off for every prompt.
KEPT_PARAMS = frozenset({"response_format"})
TEMPERATURE_NUDGE = 0.2  # a temperature under 1 is raised by this per answer a check refused

_LOG = logging.getLogger(__name__)


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
    max_requests_per_minute: float | None = None  # for the whole job
    max_tokens_per_minute: float | None = None  # for the whole job
    worker_processes: int = 1  # processes sharing the job's limits
    max_tokens: int | None = None
    temperature: float | None = None
    reasoning_effort: str | None = None
    max_retry_wait: float = 300.0
    max_response_bytes: int = 4 * 2**20
    max_caption_chars: int = 32_000
    max_cost: float | None = None  # this process's share of the job's --max_cost
    price_per_million_input_tokens: float = 0.0
    price_per_million_output_tokens: float = 0.0
    price_per_million_cached_input_tokens: float | None = None  # None: the input price
    batch_discount: float = 0.5  # Batch API price as a share of the online price
    stop_after_refusals: int = 5

    def request_params(self) -> dict:
        """The optional request parameters that are set (see request.py for spellings)."""
        return {k: v for k, v in (("max_completion_tokens", self.max_tokens),
                                  ("temperature", self.temperature),
                                  ("reasoning_effort", self.reasoning_effort)) if v is not None}

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False,
             cached_tokens: int = 0) -> float:
        """Dollars for these tokens at the run's prices (Batch API answers at the discount):
        ``cached_tokens`` of the prompt tokens (at most all of them) at the cached input price,
        the others at the input price."""
        cached = min(cached_tokens, prompt_tokens)
        cached_price = self.price_per_million_cached_input_tokens
        dollars = ((prompt_tokens - cached) * self.price_per_million_input_tokens
                   + cached * (self.price_per_million_input_tokens if cached_price is None
                               else cached_price)
                   + completion_tokens * self.price_per_million_output_tokens) / 1e6
        return dollars * self.batch_discount if batch else dollars


@dataclass
class Completion:
    """A caption (or a structured answer's JSON value) and what it cost."""

    caption: Any
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    latency_ms: float
    throttled_s: float = 0.0
    cached: bool = False
    reasoning_tokens: int | None = None
    usage_estimated: bool = False  # some token counts are the worst case (no usable usage)
    # the types of the answers a check refused before this one (degenerate, refusal,
    # too_short, schema), one per refused attempt
    rejected_answers: tuple[str, ...] = ()
    # of prompt_tokens, those the server served from its prefix cache (None: never reported)
    cached_tokens: int | None = None


class Paid(NamedTuple):
    """Tokens paid for a request's answers: as the server reported them, or where it did not
    (``estimated``) the worst case (``worst_case_usage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int | None = None
    estimated: bool = False
    cached_tokens: int | None = None  # of prompt_tokens, served from the server's prefix cache

    def plus(self, other: Paid) -> Paid:
        return Paid(self.prompt_tokens + other.prompt_tokens,
                    self.completion_tokens + other.completion_tokens,
                    _sum_reported(self.reasoning_tokens, other.reasoning_tokens),
                    self.estimated or other.estimated,
                    _sum_reported(self.cached_tokens, other.cached_tokens))

    def as_dict(self) -> dict | None:
        """A failure's ``error.paid`` block (None when nothing was paid), with
        ``cached_tokens`` when some were."""
        if not (self.prompt_tokens or self.completion_tokens):
            return None
        paid = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        if self.cached_tokens:
            paid["cached_tokens"] = self.cached_tokens
        return {**paid, "estimated": True} if self.estimated else paid


def _sum_reported(first: int | None, second: int | None) -> int | None:
    """The sum of two counts a server may not report (None: neither was)."""
    return None if first is None and second is None else (first or 0) + (second or 0)


class _MovingCount:
    """What was counted over the last ``window_ms``, kept in buckets of ``bucket_ms``."""

    def __init__(self, window_ms: int, bucket_ms: int) -> None:
        self._window_ms = window_ms
        self._bucket_ms = bucket_ms
        self._buckets: collections.deque[list[int]] = collections.deque()  # [start, count]

    def add(self, now_ms: int, count: int) -> None:
        start = now_ms - now_ms % self._bucket_ms
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([start, count])

    def sum(self, now_ms: int) -> int:
        while self._buckets and self._buckets[0][0] <= now_ms - self._window_ms:
            self._buckets.popleft()
        return sum(count for _, count in self._buckets)


class OverloadThrottle:
    """Client-side adaptive throttling (the SRE book's formula, as in Beam's AdaptiveThrottler).

    Over a sliding window, a new request is delayed with probability
    ``max(0, (attempts - ratio * accepted) / (attempts + 1))``. Unlike Beam's class, an
    attempt is counted when its answer arrives, not when it starts: with many requests in
    flight, counting at the start would throttle every client while it warms up.
    """

    def __init__(self, rng: random.Random, window_ms: int = THROTTLE_WINDOW_MS,
                 bucket_ms: int = THROTTLE_BUCKET_MS, ratio: float = THROTTLE_OVERLOAD_RATIO):
        self._attempts = _MovingCount(window_ms, bucket_ms)
        self._accepted = _MovingCount(window_ms, bucket_ms)
        self._ratio = ratio
        self._rng = rng

    def record(self, overloaded: bool) -> None:
        now = _now_ms()
        self._attempts.add(now, 1)
        if not overloaded:
            self._accepted.add(now, 1)

    def should_wait(self) -> bool:
        now = _now_ms()
        attempts = self._attempts.sum(now)
        if not attempts:
            return False
        rejection = (attempts - self._ratio * self._accepted.sum(now)) / (attempts + 1)
        return self._rng.random() < rejection


def backoff_delay(retry: int, settings: ClientSettings, retry_after: float | None,
                  rng: random.Random) -> float | None:
    """Seconds to wait before retry number ``retry + 1``; None to give up instead.

    Full-jitter exponential backoff up to ``max_backoff``, but never shorter than the server's
    Retry-After: a longer wait is honoured as asked up to ``max_retry_wait``, and beyond that
    the record is not retried early but given up (None).
    """
    ceiling = min(settings.max_backoff, settings.initial_backoff * 2 ** retry)
    delay = rng.uniform(0, ceiling)
    asked = server_wait(retry_after, "Retry-After", settings.max_retry_wait)
    if retry_after is not None and asked is None:
        return None  # a finite wait over the ceiling (retry_after_seconds gives no other)
    return delay if asked is None else max(delay, asked)


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
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                        asyncio.IncompleteReadError)):  # a body cut short
        return CaptionError("request", "connection_error",
                            f"connection failed: {type(exc).__name__}", retryable=True)
    if isinstance(exc, HTTPStatusFailure):
        status = exc.status
        code = _error_code(exc.body)
        retryable = status in RETRYABLE_STATUS or status >= 500
        type_ = "content_policy" if code == "content_policy_violation" else f"http_{status}"
        return CaptionError("request", type_, f"HTTP {status}: {error_message(exc.body)}",
                            retryable=retryable)
    return CaptionError("request", "client_error", f"{type(exc).__name__}: {exc}")


def _error_code(body) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return error["code"]
    return None


def error_message(body) -> str:
    """The message of an OpenAI-style JSON error body, or the start of any other body."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
    return str(body)[:500]


class ParsedCompletion(NamedTuple):
    """What a chat completion answer says."""

    caption: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    reasoning_tokens: int | None = None


class Answer(NamedTuple):
    """A chat completion as read (``read_completion``), before it is judged."""

    message: dict
    content: Any
    usage: ParsedCompletion  # caption "", finish reason and the usage's counts
    cached_tokens: int | None = None  # of the prompt tokens, served from the prefix cache


def parse_completion(body: bytes, max_caption_chars: int = ClientSettings.max_caption_chars,
                     max_tokens: int | None = None) -> ParsedCompletion:
    """The caption, finish reason and token counts of a response body
    (``judge_completion(read_completion(body))``)."""
    return judge_completion(read_completion(body), max_caption_chars, max_tokens)


def read_completion(body: bytes) -> Answer:
    """A response body read as a chat completion, its usage checked (``usage_counts``).

    Raises a retryable CaptionError(stage="response") for a body that is not a chat completion
    (nothing is charged for it).
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        kind = "empty_response" if not body.strip() else "malformed_response"
        raise CaptionError("response", kind, "the response body is not JSON",
                           retryable=True) from None
    try:
        choice = data["choices"][0]
        message = choice["message"]
        content = message["content"]
    except (KeyError, IndexError, TypeError):
        raise CaptionError("response", "not_a_completion",
                           "the response is not a chat completion", retryable=True) from None
    prompt, completion, reasoning, cached = usage_counts(data.get("usage"))
    return Answer(message if isinstance(message, dict) else {}, content, ParsedCompletion(
        "", _text(choice.get("finish_reason")) if isinstance(choice, dict) else None,
        prompt, completion, reasoning), cached)


def usage_counts(usage) -> tuple[int | None, int | None, int | None, int | None]:
    """The one check of an answer's ``usage`` block: its prompt, completion, reasoning and
    cached prompt token counts, each None where it is missing or not a count (``token_count``).

    Cached tokens (``prompt_tokens_details.cached_tokens``) are a part of the prompt tokens:
    more than the prompt tokens are cut to them, and without a usable prompt count they are
    ignored (the worst case charged for the prompt is priced as uncached input).
    """
    if not isinstance(usage, dict):
        return None, None, None, None
    prompt = token_count(usage.get("prompt_tokens"))
    cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
    return (prompt, token_count(usage.get("completion_tokens")),
            _detail(usage, "completion_tokens_details", "reasoning_tokens"),
            None if prompt is None or cached is None else min(cached, prompt))


def _detail(usage: dict, block: str, name: str) -> int | None:
    """The count ``name`` of the usage's ``block`` of details (None: missing, not a count)."""
    details = usage.get(block)
    return token_count(details.get(name)) if isinstance(details, dict) else None



def worst_case_usage(request_tokens: int, params: dict) -> tuple[int, int]:
    """What an answer without usable counts is charged: (prompt, completion) tokens of the
    request's estimate (``request_tokens``: its input plus the longest answer it allows) and
    the longest answer it allows (--max_tokens, else tokens.DEFAULT_COMPLETION_TOKENS)."""
    completion = params.get("max_completion_tokens") or DEFAULT_COMPLETION_TOKENS
    return max(request_tokens - completion, 0), completion


def judge_completion(answer: Answer, max_caption_chars: int = ClientSettings.max_caption_chars,
                     max_tokens: int | None = None) -> ParsedCompletion:
    """The caption of a read answer, with its finish reason and token counts.

    Raises a retryable CaptionError(stage="response") for an answer without text, and a
    permanent one for an answer that cannot improve on retry: a refusal, no text because the
    completion limit (``max_tokens``, None: the server's) was spent, a caption longer than
    ``max_caption_chars``.
    """
    message, content, parsed = answer.message, answer.content, answer.usage
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p["text"] for p in content
                          if isinstance(p, dict) and isinstance(p.get("text"), str))
    if not isinstance(content, str) or not content.strip():
        raise _no_text(parsed, message.get("refusal"), max_tokens)
    caption = encodable(content.strip())
    if len(caption) > max_caption_chars:
        raise CaptionError("response", "caption_too_long",
                           f"the caption has {len(caption)} characters, over the limit of "
                           f"{max_caption_chars} (--max_caption_chars)")
    return parsed._replace(caption=caption)


def _text(value) -> str | None:
    return encodable(value) if isinstance(value, str) else None


def _no_text(parsed: ParsedCompletion, refusal, max_tokens: int | None) -> CaptionError:
    """Why an answer has no caption: a refusal, a spent completion limit, or (retryable) nothing."""
    if isinstance(refusal, str) and refusal.strip():
        return CaptionError("response", "refusal", f"the model refused: {refusal.strip()[:500]}")
    if parsed.finish_reason == "length":
        limit = f"--max_tokens {max_tokens}" if max_tokens else "the server's limit"
        spent = f"{parsed.completion_tokens} completion tokens" \
            if parsed.completion_tokens is not None else "all completion tokens"
        if parsed.reasoning_tokens is not None:
            spent += f", {parsed.reasoning_tokens} of them reasoning"
        return CaptionError("response", "length",
                            f"the model spent its completion limit ({limit}) before writing any "
                            f"text: {spent}; raise --max_tokens or lower --reasoning_effort")
    return CaptionError("response", "empty_caption", "the model returned no text",
                        retryable=True)


def token_count(value) -> int | None:
    """A usage count as an int, or None when it is not one (a string, NaN, negative, huge)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


def request_body(settings: ClientSettings, messages: list[dict],
                 params: dict | None = None) -> bytes:
    """The JSON body of a chat completion request for VLMClient.complete, with ``params``
    (default: the settings') (built off the event loop: the image data URLs make it large)."""
    return build_body(settings.model, settings.request_params() if params is None else params,
                      messages)


def nudged(body: bytes, params: dict, model: str, rejections: int) -> tuple[bytes, dict]:
    """A request body built with ``params`` (``request_body``) and its parameters, changed to
    ask for another answer after ``rejections`` answers a check refused: ``seed`` set to
    ``rejections``, and a temperature under 1 (greedy decoding loops the same way whatever the
    seed) raised by TEMPERATURE_NUDGE each, up to 1. A server that refuses ``seed`` gets it
    dropped for the run (``AcceptedParams``). Unchanged when ``rejections`` is 0."""
    if not rejections:
        return body, params
    changed = {**params, "seed": rejections}
    temperature = params.get("temperature")
    if isinstance(temperature, (int, float)) and temperature < 1:
        changed["temperature"] = round(min(1.0, temperature + TEMPERATURE_NUDGE * rejections), 3)
    return params_head(model, changed) + body[len(params_head(model, params)):], changed


def _checked(check: Callable[[str], Any], text: str, rejected: list[str]) -> Any:
    """``check(text)``; the type of a CaptionError it raises is added to ``rejected``."""
    try:
        return check(text)
    except CaptionError as error:
        rejected.append(error.type)
        raise


def scrub_answer(answer: Any, secrets: tuple[str, ...]) -> Any:
    """An answer (text, or a structured answer's JSON value) with the key scrubbed from its
    text."""
    if isinstance(answer, str):
        return scrub(answer, secrets, urls=False)
    if isinstance(answer, list):
        return [scrub_answer(item, secrets) for item in answer]
    if isinstance(answer, dict):
        return {scrub_answer(key, secrets): scrub_answer(value, secrets)
                for key, value in answer.items()}
    return answer


class VLMClient:
    """One per worker process, used from one event loop.

    ``complete()`` runs one record's request with its own retries; at most
    ``max_concurrency`` requests are on the wire at once; backoff waits hold no slot.
    ``budget``: the --max_cost budget its answers are charged to, shared by the process's
    clients of other models (default: its own, of ``settings.max_cost``).
    """

    def __init__(self, settings: ClientSettings, api_key: str | None, seed: int | None = None,
                 budget: CostBudget | None = None):
        self.settings = settings
        self._url = settings.api_url.rstrip("/") + "/chat/completions"
        self._secrets = (api_key,) if api_key else ()
        self._headers = {"Authorization": f"Bearer {api_key or NO_KEY}",
                         "Content-Type": "application/json"}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.max_concurrency),
            timeout=aiohttp.ClientTimeout(total=None), raise_for_status=False)
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._rng = random.Random(seed)
        self._throttle = OverloadThrottle(self._rng)
        self._limiter = JobRateLimiter(settings.max_requests_per_minute,
                                       settings.max_tokens_per_minute,
                                       settings.worker_processes, self._rng,
                                       settings.max_retry_wait, self._pause)
        self._refusals = 0  # consecutive 401/403/404 answers
        if budget is None:
            budget = CostBudget(settings.max_cost, settings.worker_processes)
        self._budget = budget  # --max_cost: what this process's clients spent
        self._stopped: JobStopped | None = None
        self._budget_spent = False  # the stop is --max_cost's (its line is made when asked)
        self._stop_event = asyncio.Event()
        self._warned_usage = False
        self._accepted = AcceptedParams(settings.model)
        self._params = settings.request_params()

    def stopped(self) -> JobStopped | None:
        """Why the job stopped (None while it goes on); a --max_cost stop states what was spent
        when asked, so asked once the requests in flight have ended it is the whole spend."""
        return self._budget.stop() if self._budget_spent else self._stopped

    async def complete(self, body: bytes, tokens: int = 0, params: dict | None = None,
                       check: Callable[[str], Any] | None = None) -> Completion:
        """Send one request body (``request_body``) of ``tokens`` estimated tokens (counted
        against the tokens-per-minute limits), retrying retryable failures; raises CaptionError
        when done, JobStopped once the endpoint keeps refusing every request.

        ``params``: the parameters the body was built with (default: the settings'). ``check``
        turns an answer's text into the value kept, or raises a CaptionError (retried when
        retryable, e.g. an answer that does not conform to its schema, a repetition loop: the
        retry asks for another answer, ``nudged``).
        """
        params = self._params if params is None else params
        throttled = 0.0
        started = time.monotonic()
        attempt = 0
        paid = Paid()  # what the record's answered attempts cost
        rejected: list[str] = []  # the types of the answers ``check`` refused
        while True:
            self._may_send()
            attempt += 1
            ticket, waited = await self._wait_for_turn(tokens)
            throttled += waited
            sent_body, sent_params = self._accepted.body(
                *nudged(body, params, self.settings.model, len(rejected)))
            try:
                read = read_completion(await self._attempt(sent_body, ticket))
                paid = paid.plus(self._pay(ticket, read, tokens, params))
                parsed = judge_completion(read, self.settings.max_caption_chars,
                                          self.settings.max_tokens)
                answer = parsed.caption if check is None else _checked(check, parsed.caption,
                                                                       rejected)
            except JobStopped:
                raise
            except Exception as exc:  # every failure becomes a typed error below
                failure = exc if isinstance(exc, HTTPStatusFailure) else None
                self._throttle.record(overloaded=bool(failure and failure.overloaded))
                error = self._typed_error(exc, attempt, throttled, paid)
                self._count_refusal(failure, error)
                if self._adapt_params(failure, sent_params) and \
                        attempt <= self.settings.max_retries:
                    continue  # the same request again, spelled the way the server accepts
                if not error.retryable or attempt > self.settings.max_retries:
                    raise error from None
                retry_after = retry_after_seconds(failure.headers if failure else None)
                delay = backoff_delay(attempt - 1, self.settings, retry_after, self._rng)
                if delay is None:
                    raise self._typed_error(CaptionError(
                        "request", "throttled",
                        f"the server asked to wait {retry_after:.0f} s before retrying, over "
                        f"--max_retry_wait {self.settings.max_retry_wait:g} s "
                        f"(after {error.type})", retryable=True), attempt, throttled,
                        paid) from None
                await self._pause(delay)
                continue
            self._throttle.record(overloaded=False)
            self._refusals = 0
            return Completion(scrub_answer(answer, self._secrets),
                              parsed.finish_reason, paid.prompt_tokens,
                              paid.completion_tokens, attempt,
                              round((time.monotonic() - started) * 1000, 1), round(throttled, 3),
                              reasoning_tokens=paid.reasoning_tokens,
                              usage_estimated=paid.estimated,
                              rejected_answers=tuple(rejected),
                              cached_tokens=paid.cached_tokens)

    def _pay(self, ticket: Ticket, answer: Answer, tokens: int, params: dict) -> Paid:
        """Count an answer's tokens against the rate limits and its price against the budget;
        what it is charged: its usage, or for counts it lacks the worst case."""
        usage = answer.usage
        worst_prompt, worst_completion = worst_case_usage(tokens, params)
        prompt = worst_prompt if usage.prompt_tokens is None else usage.prompt_tokens
        completion = (worst_completion if usage.completion_tokens is None
                      else usage.completion_tokens)
        estimated = usage.prompt_tokens is None or usage.completion_tokens is None
        if estimated and not self._warned_usage:
            self._warned_usage = True
            _LOG.warning(
                "an answer from %s has no usable token counts (usage missing, or counts that "
                "are not numbers of tokens): such answers are charged a worst case, the "
                "request's estimated input tokens plus the longest answer it allows "
                "(--max_tokens, else %d), in tokens, cost and --max_cost (warned once)",
                redact_url(self.settings.api_url), DEFAULT_COMPLETION_TOKENS)
        self._limiter.settle(ticket, prompt + completion)
        self._budget.charge(self.settings.model, self.settings.cost(
            prompt, completion, cached_tokens=answer.cached_tokens or 0))
        return Paid(prompt, completion, usage.reasoning_tokens, estimated, answer.cached_tokens)

    def _may_send(self) -> None:
        """JobStopped when the job has stopped (refusals, budget): checked before each of a record's
        attempts and again when a request gets its slot, so nothing queued is sent after."""
        if self._stopped:
            raise self._stopped
        if self._budget.is_spent():
            self._budget_spent = True
            self._stop(self.stopped())  # type: ignore[arg-type]

    def _stop(self, stopped: JobStopped) -> None:
        """Stop the job: nothing new is sent, and attempts waiting for their turn end at once."""
        self._stopped = stopped
        self._stop_event.set()
        raise stopped

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, unless the job stops first (JobStopped)."""
        if self._stopped:
            raise self._stopped
        try:
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        except TimeoutError:
            return
        assert self._stopped is not None  # set with the event
        raise self._stopped

    def _typed_error(self, exc: BaseException, attempt: int, throttled: float,
                     paid: Paid) -> CaptionError:
        """The CaptionError for a failed attempt, its message scrubbed of the key, with what the
        record's attempts paid."""
        error = classify_exception(exc)
        return CaptionError(error.stage, error.type, scrub(error.message, self._secrets),
                            error.retryable, attempt, round(throttled, 3), paid.as_dict())

    def _adapt_params(self, failure: HTTPStatusFailure | None, sent_params: dict) -> bool:
        """Whether a 400 refused one of the optional parameters the attempt was sent with; if
        so they are respelled or dropped (once for the run) and the record is sent again."""
        if failure is None:
            return False
        name = refused_param(failure.status, failure.body, sent_params)
        if name is None or name in KEPT_PARAMS:
            return False
        self._accepted.adapt(name, f"model {self.settings.model!r}")
        return True

    def _count_refusal(self, failure: HTTPStatusFailure | None, error: CaptionError) -> None:
        """Stop the client after ``stop_after_refusals`` consecutive 401/403/404 answers."""
        if failure is None or failure.status not in SYSTEMIC_STATUS:
            self._refusals = 0
            return
        self._refusals += 1
        if self._refusals >= self.settings.stop_after_refusals and not self._stopped:
            self._stop(JobStopped(
                f"{self._refusals} requests in a row were refused with HTTP {failure.status} "
                f"({SYSTEMIC_STATUS[failure.status]}) by {redact_url(self.settings.api_url)}: "
                f"{error.message}. Unsent records are left for --resume once that is fixed."))

    async def _wait_for_turn(self, tokens: int) -> tuple[Ticket, float]:
        """Client-side throttling: adaptive (after overload answers), then the job's and the
        account's rate limits. The attempt's ticket and the seconds waited."""
        waited = 0.0
        while self._throttle.should_wait():
            delay = THROTTLE_DELAY_S * (0.5 + self._rng.random())
            await self._pause(delay)
            waited += delay
        ticket, limited = await self._limiter.acquire(tokens)
        return ticket, waited + limited

    async def _attempt(self, body: bytes, ticket: Ticket) -> bytes:
        """One attempt: the answer's body, or HTTPStatusFailure / a transport error."""
        headers = None
        try:
            async with self._slots:
                self._may_send()  # the job may have stopped while this request waited
                async with asyncio.timeout(self.settings.request_timeout):
                    async with self._session.post(self._url, data=body,
                                                  headers=self._headers) as response:
                        headers = response.headers
                        if response.status >= 400:
                            raise HTTPStatusFailure(
                                response.status, headers,
                                await _read_capped(response, ERROR_BODY_BYTES, truncate=True))
                        answer = await _read_capped(response, self.settings.max_response_bytes)
        finally:
            self._limiter.observe(ticket, headers)  # the account's state, if the server says
        return answer

    async def aclose(self) -> None:
        await self._session.close()


async def _read_capped(response: aiohttp.ClientResponse, limit: int,
                       truncate: bool = False) -> bytes:
    """At most ``limit`` bytes of a response body: the rest is dropped (``truncate``) or the
    answer is refused as too large, so an endless body cannot grow the worker."""
    length = response.content_length
    if length is not None and length <= limit:
        return await response.content.readexactly(length)  # the usual case: one call, one copy
    if length is not None and not truncate:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                break
            raise _too_large(limit)
    return b"".join(chunks)[:limit]


def _too_large(limit: int) -> CaptionError:
    return CaptionError("response", "response_too_large",
                        f"the response body is larger than {limit} bytes (--max_response_bytes)")


def _now_ms() -> int:
    return int(time.time() * 1000)
