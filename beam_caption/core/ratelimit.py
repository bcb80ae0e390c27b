"""Job-wide rate limits: every worker process paces its requests so that the whole job keeps
within an account's requests and tokens per minute, however many processes run.

Two sources; a request waits for both:

- The figures a user gives (``--max_requests_per_minute``, ``--max_tokens_per_minute``) are
  for the whole job. Each process gets an even share (the job's worker processes are counted
  at launch, ``options.worker_processes``) as a token bucket: request starts are spaced
  evenly, and tokens may run ahead by at most one second of the share.
- The account's own state, from the ``x-ratelimit-limit/remaining/reset-requests|tokens``
  headers OpenAI-style servers send with answers. They describe the account, so every process
  sees what the others (and other jobs on the account) spent: a process whose estimate of what
  remains (the last figure seen, minus what it sent since, plus the refill since) is below a
  request's cost holds that request until the refill covers it. Each process claims only its
  share (one of the job's worker processes) of what remains and of the refill, so processes
  converge on the account's rate without talking to each other.

A process's first request goes alone (for up to ``FIRST_ANSWER_WAIT_S``), so that what the
server says of the account is known before the others go. A request's tokens are counted before
it is sent (``tokens.estimate_request_tokens``) and the token bucket is corrected by the answer's
usage. Used from one event loop per process.

Every wait the project takes from a server goes through ``server_wait`` here: Retry-After and
retry-after-ms (client.py), the reset headers and the waits derived from the limit headers.
Values that are not a finite number of seconds >= 0 are ignored (the caller's default: our own
backoff, or no account wait); a wait above the ceiling (``--max_retry_wait``, default
``DEFAULT_MAX_SERVER_WAIT_S``) is never taken: a record asked to wait longer fails as
request/throttled, a limit header asking for longer is ignored (the server's 429s then pace the
job). Each refusal is a debug line.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

TOKEN_BURST_S = 1.0  # a process's tokens bucket holds this many seconds of its share
FIRST_ANSWER_WAIT_S = 5.0  # the longest the others wait for the first request's answer
JITTER = 0.25  # waits on the account are stretched by up to this share, so processes spread
RESOURCES = ("requests", "tokens")
DEFAULT_MAX_SERVER_WAIT_S = 300.0  # --max_retry_wait's default: the ceiling of server waits

_LOG = logging.getLogger(__name__)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds in a reset header: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s`` or a plain number."""
    if not text:
        return None
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return _ignored("a reset header", text)
        unit_s = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
        value = sum(float(number) * unit_s[unit] for number, unit in parts)
    return value if math.isfinite(value) and value >= 0 else _ignored("a reset header", text)


def retry_after_seconds(headers) -> float | None:
    """Seconds asked for by ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date), as
    given (``server_wait`` bounds it); None when absent or not a finite number >= 0."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        value = _number(millis, "retry-after-ms")
        if value is not None:
            return value / 1000
    text = headers.get("retry-after")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            value = max(0.0, email.utils.parsedate_to_datetime(text).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError):
            return _ignored("Retry-After", text)
    return value if math.isfinite(value) and value >= 0 else _ignored("Retry-After", text)


def server_wait(seconds: float | None, what: str, ceiling: float) -> float | None:
    """The one rule for a wait a server asks for, directly or through figures it is derived
    from: the seconds to wait, or None where it is not taken (absent, not a finite number >= 0,
    or above ``ceiling``, --max_retry_wait: a debug line); the caller then falls back to its
    default (see the module)."""
    if seconds is None:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return _ignored(what, seconds)
    if seconds > ceiling:
        _LOG.debug("not waiting %.4g s for %s: over the ceiling of %g s (--max_retry_wait)",
                   seconds, what, ceiling)
        return None
    return seconds


def _ignored(what: str, value) -> float | None:
    """None, the value of a figure not taken, with a debug line."""
    _LOG.debug("ignoring %s of %.200r: not a usable figure", what, value)
    return None


def _number(text: str | None, what: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return _ignored(what, text)
    return value if math.isfinite(value) and value >= 0 else _ignored(what, text)


@dataclass
class AccountState:
    """One resource of the account as the server last described it."""

    limit: float | None  # per minute
    remaining: float
    reset_s: float | None  # until the account is full again

    @classmethod
    def from_headers(cls, headers, resource: str) -> AccountState | None:
        remaining = _number(headers.get(f"x-ratelimit-remaining-{resource}"),
                            f"x-ratelimit-remaining-{resource}")
        if remaining is None:
            return None
        name = f"x-ratelimit-limit-{resource}"
        limit = _number(headers.get(name), name)
        if limit is not None and limit < 1:  # admits no request a minute: not a limit
            _ignored(name, limit)
            limit = None
        return cls(limit, remaining, parse_duration(headers.get(f"x-ratelimit-reset-{resource}")))


class _Bucket:
    """A token bucket refilled at ``per_minute``; a take may run into debt, which the taker
    waits out (so takers are served in order and a cost above the capacity still goes)."""

    def __init__(self, per_minute: float, capacity: float):
        self._rate = per_minute / 60
        self._capacity = capacity
        self._level = capacity
        self._stamp = time.monotonic()

    def take(self, amount: float) -> float:
        """Take ``amount``; seconds to wait before using it."""
        now = time.monotonic()
        self._level = min(self._capacity, self._level + (now - self._stamp) * self._rate)
        self._stamp = now
        self._level -= amount
        return max(0.0, -self._level / self._rate)

    def give_back(self, amount: float) -> None:
        """Correct a take (a negative amount takes more)."""
        self._level = min(self._capacity, self._level + amount)


class _AccountView:
    """What this process may still spend of one resource of the account: its share (one of
    ``processes``) of what the server last said remains, less what it sent since, plus its share
    of the refill since."""

    def __init__(self, processes: int) -> None:
        self._processes = processes
        self._state: AccountState | None = None
        self._seen_at = 0.0
        self._seen_spent = 0.0  # this process's spend the state already reflects
        self._seen_seq = -1

    def observe(self, state: AccountState, seq: int, spent_through: float) -> None:
        """A state the server gave with the answer to request ``seq`` (later ones win)."""
        if seq > self._seen_seq:
            self._state, self._seen_seq = state, seq
            self._seen_at, self._seen_spent = time.monotonic(), spent_through

    def wait_for(self, cost: float, spent: float) -> float:
        """Seconds until ``cost`` fits in this process's share (0 when it fits or nothing is
        known). A cost above a whole share waits for a full share and overdraws it."""
        state = self._state
        if state is None:
            return 0.0
        elapsed = time.monotonic() - self._seen_at
        sent_since = spent - self._seen_spent
        if state.limit:  # refilled at limit/60 per second, up to the limit
            refill = state.limit / 60 / self._processes
            share = min(state.limit, state.remaining + elapsed * state.limit / 60)
            needed = min(cost, state.limit / self._processes)
            return max(0.0, (needed - (share / self._processes - sent_since)) / refill)
        if state.remaining / self._processes - sent_since >= cost or state.reset_s is None:
            return 0.0
        return max(0.0, state.reset_s - elapsed)  # full again then


@dataclass
class Ticket:
    """A request's place in the limiter: its number and its estimated tokens."""

    seq: int
    tokens: int
    spent_through: tuple[float, float]  # requests, tokens spent up to and with this one


class JobRateLimiter:
    """Paces one worker process's requests to its share of the job's limits and to the
    account's state from the answers' headers."""

    def __init__(self, requests_per_minute: float | None = None,
                 tokens_per_minute: float | None = None, worker_processes: int = 1,
                 rng: random.Random | None = None,
                 max_wait: float = DEFAULT_MAX_SERVER_WAIT_S,
                 sleep: Callable[[float], Awaitable] = asyncio.sleep):
        """``max_wait``: the ceiling of waits the account's headers ask for (``server_wait``);
        ``sleep``: how to wait (the client's stops when the job stops)."""
        self._max_wait = max_wait
        self._sleep = sleep
        share = 1 / max(1, worker_processes)
        self._buckets = (
            _Bucket(requests_per_minute * share, 1) if requests_per_minute else None,
            _Bucket(tokens_per_minute * share, tokens_per_minute * share / 60 * TOKEN_BURST_S)
            if tokens_per_minute else None)
        self._views = (_AccountView(max(1, worker_processes)),
                       _AccountView(max(1, worker_processes)))
        self._spent = [0.0, 0.0]
        self._seq = 0
        self._rng = rng or random.Random()
        self._answered = asyncio.Event()  # the first answer came: headers or none are known

    async def acquire(self, tokens: int) -> tuple[Ticket, float]:
        """Wait until a request of ``tokens`` may start; its ticket and the seconds waited
        (0.0 when it did not wait)."""
        started = time.monotonic()
        waited = False
        if self._seq and not self._answered.is_set():  # slow start: the first goes alone
            waited = True
            try:
                await asyncio.wait_for(self._answered.wait(), FIRST_ANSWER_WAIT_S)
            except TimeoutError:
                self._answered.set()  # a slow first answer holds the others back no longer
        costs = (1, tokens)
        for bucket, cost in zip(self._buckets, costs, strict=True):
            if bucket is not None:
                delay = bucket.take(cost)
                if delay > 0:
                    waited = True
                    await self._sleep(delay)
        while True:
            asked = server_wait(max(view.wait_for(cost, spent)
                                    for view, cost, spent in zip(self._views, costs,
                                                                 self._spent, strict=True)),
                                "the account's rate-limit headers", self._max_wait)
            if not asked:  # nothing to wait, or a wait that is not taken
                break
            waited = True
            await self._sleep(asked * (1 + JITTER * self._rng.random()))
        self._spent[0] += 1
        self._spent[1] += tokens
        self._seq += 1
        return (Ticket(self._seq, tokens, (self._spent[0], self._spent[1])),
                time.monotonic() - started if waited else 0.0)

    def observe(self, ticket: Ticket, headers) -> None:
        """Read the account's state from an attempt's answer headers (any status; None when no
        answer came)."""
        self._answered.set()
        if headers is None:
            return
        for index, resource in enumerate(RESOURCES):
            state = AccountState.from_headers(headers, resource)
            if state is not None:
                self._views[index].observe(state, ticket.seq, ticket.spent_through[index])

    def settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        """Correct the token share by what the answer says the request used."""
        bucket = self._buckets[1]
        if bucket is not None and used_tokens is not None:
            bucket.give_back(ticket.tokens - used_tokens)
