"""CaptionImages: keyed records in, captioned records and failure records out.

One ``CaptionRuntime`` per worker process (``Shared``) owns an asyncio event loop in a
background thread, one ``VLMClient``, a thread pool for storage reads (image files, cache
entries) and one with a thread per core for image decoding and encoding. The DoFn
hands each record to that loop and keeps up to a window of records in flight across the
bundle, so a slow request never holds up the others and free slots are refilled at once.
Image bytes held by records in flight (source files, then request bodies) are bounded by a
byte budget, so memory does not grow with concurrency or image size.
Outputs and metrics are emitted from the bundle thread only.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import queue
import threading
import weakref

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from beam_caption.cache import RequestCache, request_digest
from beam_caption.client import ClientSettings, VLMClient, request_body
from beam_caption.errors import CaptionError, JobStopped
from beam_caption.images import (ImageSettings, prepare_image_bytes, read_image_bytes,
                                 resolve_image_path)
from beam_caption.manifest import FAILURES, METRICS_NAMESPACE
from beam_caption.messages import PromptSettings, build_messages, plan_request
from beam_caption.options import resolve_api_key
from beam_caption.resume import CheckpointWriter, record_fingerprint, settings_digest

IO_THREADS_MAX = 64
RECENT_SIZES = 64  # a record's source size is estimated as the largest of this many recent ones
FIRST_ESTIMATE_SHARE = 8  # before any read, a record is assumed to take 1/8 of the budget

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """Everything a worker needs to caption records; picklable and free of secrets."""

    client: ClientSettings
    prompts: PromptSettings
    images: ImageSettings
    image_root: str
    output_key: str = "caption"
    api_key_env: str | None = None
    checkpoint_dir: str | None = None  # output dir whose .checkpoint/ receives finished captions
    checkpoint_interval: float = 10.0
    cache_dir: str | None = None
    max_bytes_in_flight: int = 256 * 2**20
    image_timeout: float = 60.0

    @functools.cached_property
    def settings_digest(self) -> str:
        """Digest of every setting that shapes an answer (``caption_meta.fingerprint``)."""
        images = self.images
        return settings_digest({
            "model": self.client.model, "params": self.client.request_params(),
            "prompts": dataclasses.asdict(self.prompts), "image_root": self.image_root,
            "images": {"max_side": images.max_side, "jpeg_quality": images.jpeg_quality,
                       "max_pixels": images.max_pixels},
            "output_key": self.output_key})


class ByteBudget:
    """Bytes held by records in flight; ``acquire`` waits while the budget is spent.

    A record larger than the whole budget still runs, alone. Used from one event loop.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size

    async def resize(self, old: int, new: int) -> None:
        """Hold ``new`` bytes instead of ``old`` (without waiting: the bytes exist already)."""
        async with self._changed:
            self.used += new - old
            if new < old:
                self._changed.notify_all()


class CaptionRuntime:
    """Event loop thread + VLM client + image thread pool, shared by a worker's DoFns."""

    def __init__(self, config: CaptionConfig):
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="beam-caption-loop")
        self._thread.start()
        self._io_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(config.client.max_concurrency, IO_THREADS_MAX),
            thread_name_prefix="beam-caption-io")
        self._cpu_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=usable_cores(), thread_name_prefix="beam-caption-image")
        api_key = resolve_api_key(config.api_key_env)
        self._client = self.call(_make_client(config.client, api_key))
        self._cache = RequestCache(config.cache_dir, self._run_io)
        self._budget = ByteBudget(config.max_bytes_in_flight)
        self._recent_sizes: collections.deque[int] = collections.deque(
            [min(config.images.max_bytes, config.max_bytes_in_flight // FIRST_ESTIMATE_SHARE)],
            maxlen=RECENT_SIZES)
        # Shared keeps the runtime for the life of the worker process; close it at exit.
        self.close = weakref.finalize(self, _shutdown, self._loop, self._client,
                                      (self._io_pool, self._cpu_pool))

    def _run_io(self, function, *args):
        return self._loop.run_in_executor(self._io_pool, function, *args)

    def call(self, coroutine):
        """Run a coroutine on the runtime's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, element: dict) -> concurrent.futures.Future:
        """Start captioning one keyed record; the future resolves to (tag, output, stats)."""
        return asyncio.run_coroutine_threadsafe(self._caption(element), self._loop)

    async def _caption(self, element: dict):
        record = element["record"]
        try:
            plan = plan_request(record, self.config.prompts)
            completion = await self._budgeted_completion(plan)
        except CaptionError as error:
            return FAILURES, failure_element(element, error), error.attempts, error.throttled_s
        except JobStopped:
            raise
        except Exception as exc:  # a bug must not lose the record: report it as a failure
            _LOG.exception("internal error while captioning %s", element["key"])
            error = CaptionError("request", "internal_error", f"{type(exc).__name__}: {exc}")
            return FAILURES, failure_element(element, error), 0, 0.0
        meta = {
            "model": self.config.client.model,
            "attempts": completion.attempts,
            "latency_ms": completion.latency_ms,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "reasoning_tokens": completion.reasoning_tokens,
            "finish_reason": completion.finish_reason,
            "cached": completion.cached,
            "key": element["key"],
            "fingerprint": record_fingerprint(record, self.config.settings_digest),
        }
        output = dict(record)
        output[self.config.output_key] = completion.caption
        output["caption_meta"] = meta
        return None, output, completion.attempts, completion.throttled_s

    async def _budgeted_completion(self, plan):
        """Read, prepare and send one record's request within the byte budget.

        The record holds an estimate of its source size before reading (the largest of the
        recent ones), then the real size, then its request body's size until the answer is in.
        """
        held = max(self._recent_sizes)
        await self._budget.acquire(held)
        try:
            sources = await self._read_with_timeout(plan.image_paths)
            size = sum(map(len, sources))
            self._recent_sizes.append(size)
            await self._budget.resize(held, size)
            held = size
            body, digest = await self._loop.run_in_executor(self._cpu_pool, self._request,
                                                            plan, sources)
            del sources
            await self._budget.resize(held, len(body))
            held = len(body)
            return await self._cache.complete(digest, lambda: self._client.complete(body))
        finally:
            await self._budget.resize(held, 0)

    async def _read_with_timeout(self, paths: tuple[str, ...]) -> list[bytes]:
        timeout = self.config.image_timeout
        try:
            return await asyncio.wait_for(self._run_io(self._read_images, paths), timeout)
        except TimeoutError:
            raise CaptionError("image", "image_timeout",
                               f"reading the record's images took over {timeout:g} s "
                               "(--image_timeout)", retryable=True) from None

    def _read_images(self, paths: tuple[str, ...]) -> list[bytes]:
        """A record's image files, read one after the other: one pool task per record."""
        root, max_bytes = self.config.image_root, self.config.images.max_bytes
        timeout = self.config.image_timeout
        return [read_image_bytes(resolve_image_path(path, root), max_bytes, timeout)
                for path in paths]

    def _request(self, plan, sources: list[bytes]) -> tuple[bytes, str]:
        """Decode, resize and encode the images; the request body and its cache key."""
        urls = [prepare_image_bytes(data, self.config.images).data_url for data in sources]
        body = request_body(self.config.client,
                            build_messages(plan, urls, self.config.prompts.system_prompt))
        return body, request_digest(body)


def usable_cores() -> int:
    """Cores this process may run on (taskset, cpusets), not all the machine has."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _shutdown(loop, client, pools) -> None:
    """Close the client's connections, stop the loop thread and the pools."""
    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # exiting anyway: the sockets close with the process
        loop.call_soon_threadsafe(loop.stop)
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


async def _make_client(settings: ClientSettings, api_key: str | None) -> VLMClient:
    return VLMClient(settings, api_key)


def failure_element(element: dict, error: CaptionError) -> dict:
    """A failure record as the output contract defines it."""
    return {"key": element["key"], "source": element["source"], "record": element["record"],
            "error": error.to_dict()}


class _CaptionRecords(beam.DoFn):
    def __init__(self, config: CaptionConfig, shared_handle: shared.Shared):
        self._config = config
        self._shared = shared_handle
        self._captioned = Metrics.counter(METRICS_NAMESPACE, "captioned")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "failed")
        self._retries = Metrics.counter(METRICS_NAMESPACE, "retries")
        self._prompt_tokens = Metrics.counter(METRICS_NAMESPACE, "prompt_tokens")
        self._completion_tokens = Metrics.counter(METRICS_NAMESPACE, "completion_tokens")
        self._reasoning_tokens = Metrics.counter(METRICS_NAMESPACE, "reasoning_tokens")
        self._throttled_ms = Metrics.counter(METRICS_NAMESPACE, "throttled_ms")
        self._latency = Metrics.distribution(METRICS_NAMESPACE, "latency_ms")

    def setup(self):
        config = self._config
        self._runtime = self._shared.acquire(lambda: CaptionRuntime(config), tag=repr(config))
        self._window = 2 * config.client.max_concurrency + usable_cores()

    def start_bundle(self):
        self._pending: dict[concurrent.futures.Future, tuple] = {}
        self._finished: queue.SimpleQueue[concurrent.futures.Future] = queue.SimpleQueue()
        config = self._config
        self._checkpoints = (CheckpointWriter(config.checkpoint_dir, config.checkpoint_interval)
                             if config.checkpoint_dir else None)

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        future = self._runtime.submit(element)
        self._pending[future] = (timestamp, window)
        future.add_done_callback(self._finished.put)
        if len(self._pending) >= self._window:
            yield self._emit(self._wait_for_one())
        yield from self._emit_finished()

    def finish_bundle(self):
        while self._pending:
            yield self._emit(self._wait_for_one())
        if self._checkpoints:
            self._checkpoints.flush()

    def _wait_for_one(self) -> concurrent.futures.Future:
        try:
            return self._finished.get()
        except KeyboardInterrupt:
            self._checkpoint_finished()
            raise

    def _emit_finished(self):
        while True:
            try:
                future = self._finished.get_nowait()
            except queue.Empty:
                return
            yield self._emit(future)

    def _emit(self, future: concurrent.futures.Future):
        timestamp, window = self._pending.pop(future)
        try:
            tag, output, attempts, throttled_s = future.result()
        except JobStopped:
            self._checkpoint_finished()
            raise
        self._count(tag, output, attempts, throttled_s)
        value = WindowedValue(output, timestamp, (window,))
        return beam.pvalue.TaggedOutput(tag, value) if tag else value

    def _checkpoint_finished(self):
        """On Ctrl-C or a stop, save the captions that finished but were not emitted yet."""
        if not self._checkpoints:
            return
        for future in self._pending:
            if (future.done() and not future.cancelled() and future.exception() is None
                    and future.result()[0] is None):
                self._checkpoints.add(future.result()[1])
        self._checkpoints.flush()

    def _count(self, tag, output, attempts, throttled_s):
        if attempts > 1:
            self._retries.inc(attempts - 1)
        if throttled_s:
            self._throttled_ms.inc(int(throttled_s * 1000))
        if tag:
            self._failed.inc()
            return
        meta = output["caption_meta"]
        if self._checkpoints:
            self._checkpoints.add(output)
        self._captioned.inc()
        self._prompt_tokens.inc(meta["prompt_tokens"] or 0)
        self._completion_tokens.inc(meta["completion_tokens"] or 0)
        self._reasoning_tokens.inc(meta["reasoning_tokens"] or 0)
        self._latency.update(int(meta["latency_ms"]))


class CaptionImages(beam.PTransform):
    """Caption keyed record elements (from ReadManifests).

    Returns ``{"captions": PCollection[dict], "failures": PCollection[dict]}``.
    """

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self._config = config

    def expand(self, records):
        results = records | "Caption" >> beam.ParDo(
            _CaptionRecords(self._config, shared.Shared())).with_outputs(FAILURES, main="captions")
        return {"captions": results.captions, FAILURES: results[FAILURES]}
