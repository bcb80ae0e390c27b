"""Content-hash cache: the same image + prompt + model + parameters is paid for once.

The key is a SHA-256 of the request body exactly as it is sent (model, sampling
parameters and messages, with the prepared images inside), so any change to the image,
prompt, model or preparation settings is a different key. Within a worker process,
duplicates are coalesced in memory (a duplicate of a request still in flight waits for it);
with ``--cache_dir`` (any fsspec URL) answers are also stored as small JSON files that later
runs and other workers reuse. Failures are never cached. The store is best effort: an error
reading it is a miss and an error writing it is logged, never a failed record.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable

import fsspec

from beam_caption.core.client import Completion

MEMORY_ENTRIES = 50_000

_LOG = logging.getLogger(__name__)


def request_digest(body: bytes) -> str:
    """The cache key of a request body (``client.request_body``)."""
    return hashlib.sha256(body).hexdigest()


class _DirectoryStore:
    """Completions as ``DIR/ab/abcdef....json`` files on any fsspec filesystem (blocking)."""

    def __init__(self, url: str):
        self._fs, self._root = fsspec.core.url_to_fs(url)

    def _path(self, digest: str) -> str:
        return f"{self._root.rstrip('/')}/{digest[:2]}/{digest}.json"

    def get(self, digest: str) -> dict | None:
        try:
            return json.loads(self._fs.cat_file(self._path(digest)))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn write: treat as a miss, it will be rewritten
            return None

    def put(self, digest: str, entry: dict) -> None:
        path = self._path(digest)
        self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._fs.pipe_file(path, json.dumps(entry).encode("utf-8"))


class RequestCache:
    """Coalesces identical requests in one worker and optionally persists their answers.

    Used from one event loop. ``run_blocking`` runs the directory store's blocking I/O off
    the loop (e.g. ``loop.run_in_executor`` on a thread pool).
    """

    def __init__(self, cache_dir: str | None,
                 run_blocking: Callable[..., Awaitable]):
        self._store = _DirectoryStore(cache_dir) if cache_dir else None
        self._run_blocking = run_blocking
        self._memory: collections.OrderedDict[str, Completion] = collections.OrderedDict()
        self._in_flight: dict[str, asyncio.Future] = {}

    async def complete(self, digest: str,
                       send: Callable[[], Awaitable[Completion]]) -> Completion:
        """The cached answer for ``digest``, else ``send()``'s (stored for next time).

        A cached answer comes back with ``attempts=0`` and ``cached=True``.
        """
        if digest in self._memory:
            self._memory.move_to_end(digest)
            return _as_cached(self._memory[digest])
        if digest in self._in_flight:
            return _as_cached(await asyncio.shield(self._in_flight[digest]))
        future = asyncio.get_running_loop().create_future()
        self._in_flight[digest] = future
        try:
            completion = await self._lookup(digest)
            if completion is None:
                completion = await send()
                await self._store_entry(digest, completion)
            self._remember(digest, completion)
            future.set_result(completion)
            return completion
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: waiters re-raise it, nobody logs it
            raise
        finally:
            del self._in_flight[digest]

    async def _lookup(self, digest: str) -> Completion | None:
        if self._store is None:
            return None
        try:
            entry = await self._run_blocking(self._store.get, digest)
            if not entry:
                return None
            return _as_cached(Completion(
                caption=entry["caption"], finish_reason=entry.get("finish_reason"),
                prompt_tokens=entry.get("prompt_tokens"),
                completion_tokens=entry.get("completion_tokens"), attempts=0, latency_ms=0.0,
                reasoning_tokens=entry.get("reasoning_tokens")))
        except Exception as exc:  # an unreadable store or entry is a miss, not a failure
            _LOG.warning("request cache: reading %s failed (%s: %s); sending the request",
                         digest, type(exc).__name__, exc)
            return None

    async def _store_entry(self, digest: str, completion: Completion) -> None:
        """Keep a paid answer for later runs; a store error loses the cache entry only."""
        if self._store is None:
            return
        try:
            await self._run_blocking(self._store.put, digest, _entry(completion))
        except Exception as exc:
            _LOG.warning("request cache: storing %s failed (%s: %s); the caption is kept",
                         digest, type(exc).__name__, exc)

    def _remember(self, digest: str, completion: Completion) -> None:
        self._memory[digest] = completion
        if len(self._memory) > MEMORY_ENTRIES:
            self._memory.popitem(last=False)


def _entry(completion: Completion) -> dict:
    return {"caption": completion.caption, "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "reasoning_tokens": completion.reasoning_tokens}


def _as_cached(completion: Completion) -> Completion:
    return dataclasses.replace(completion, attempts=0, latency_ms=0.0, throttled_s=0.0,
                               cached=True)
