"""CaptionImages: keyed records in, captioned records and failure records out.

The DoFn hands each record to its worker's ``CaptionRuntime`` (core/engine.py) and keeps up to a
window of records in flight across the bundle, so a slow request never holds up the others
and free slots are refilled at once. With ``copy_images`` each record is marked so that its
caption carries its images' bytes (core/records.keeping_images). Outputs and metrics are
emitted from the bundle thread only (Beam drops metrics updated from other threads).

When the job must stop (``JobStopped``: --max_cost spent, the endpoint refusing), nothing new
is sent, but the records whose requests are on the wire are waited for (each within
--request_timeout, STOP_GRACE_S more in all) and emitted, so the checkpoint step keeps every
answer that was paid for; then the stop is raised with what was spent by then.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from beam_caption.core.engine import CaptionRuntime, WorkerConfig, usable_cores
from beam_caption.core.errors import JobStopped
from beam_caption.core.figures import figures_for
from beam_caption.core.records import (
    CAPTIONS,
    FAILURES,
    METRICS_NAMESPACE,
    STATS,
    Outcome,
    caption_retries,
    keeping_images,
)

PROGRESS_LOG_S = 60.0  # a worker logs its counts at info level at most this often
STOP_GRACE_S = 10.0  # on a stop, beyond --request_timeout, for the records in flight to end

_LOG = logging.getLogger(__name__)


class _CaptionRecords(beam.DoFn):
    def __init__(self, config: WorkerConfig, shared_handle: shared.Shared,
                 progress_dir: str | None = None, copy_images: bool = False):
        self._config = config
        self._copy_images = copy_images
        self._shared = shared_handle
        self._progress_dir = progress_dir
        self._captioned = Metrics.counter(METRICS_NAMESPACE, "captioned")
        self._images = Metrics.counter(METRICS_NAMESPACE, "images")
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
        self._done = {"captioned": 0, "failed": 0, "retries": 0}
        self._progress = figures_for(self._progress_dir)  # a local run's live figures
        self._image_key = config.prompts.image_key
        self._logged_at = time.monotonic()
        self._spent_before: float | None = None

    def start_bundle(self) -> None:
        self._pending: dict[concurrent.futures.Future, tuple] = {}
        self._finished: queue.SimpleQueue[concurrent.futures.Future] = queue.SimpleQueue()
        self._throttled_in_bundle_ms = 0

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam,
                spent_before=None):
        if spent_before is not None and spent_before != self._spent_before:
            self._spent_before = spent_before  # before this bundle's first request is sent
            self._runtime.count_spent_before(spent_before)
        future = self._runtime.submit(keeping_images(element) if self._copy_images else element)
        self._pending[future] = (timestamp, window)
        future.add_done_callback(self._finished.put)
        if len(self._pending) >= self._window:
            yield from self._emit_next()
        yield from self._emit_finished()

    def finish_bundle(self):
        while self._pending:
            yield from self._emit_next()
        if self._throttled_in_bundle_ms:
            yield beam.pvalue.TaggedOutput(STATS, GlobalWindows.windowed_value(
                {"throttled_ms": self._throttled_in_bundle_ms}))
        self._progress.flush()

    def _emit_next(self):
        """Wait for the next record to finish and emit it."""
        try:
            future = self._finished.get()
        except KeyboardInterrupt:
            yield from self._emit_before_stopping()
            raise
        yield from self._emit(future)

    def _emit_finished(self):
        while True:
            try:
                future = self._finished.get_nowait()
            except queue.Empty:
                return
            yield from self._emit(future)

    def _emit(self, future: concurrent.futures.Future):
        timestamp, window = self._pending.pop(future)
        try:
            outcome: Outcome = future.result()
        except JobStopped as stop:
            yield from self._finish_in_flight()
            raise self._runtime.stopped(stop) from None
        self._count(outcome)
        if outcome.failure is not None:
            yield beam.pvalue.TaggedOutput(FAILURES, WindowedValue(outcome.failure, timestamp,
                                                                   (window,)))
        else:
            yield WindowedValue(outcome.caption, timestamp, (window,))

    def _finish_in_flight(self):
        """On a stop: wait for the records in flight (each request sent ends within
        --request_timeout; records not sent end at once) and emit them, so the steps after this
        one (checkpoints) keep every paid answer; records still running after the grace are
        given up (their requests were past their timeout)."""
        pending = list(self._pending)
        concurrent.futures.wait(pending, self._config.client.request_timeout + STOP_GRACE_S)
        for future in pending:
            if future.done() and not future.cancelled() and future.exception() is None:
                yield from self._emit(future)
            else:
                future.cancel()
        self._progress.flush()

    def _emit_before_stopping(self):
        """On Ctrl-C, emit what finished but was not emitted yet, so the steps after this one
        (checkpoints) keep the paid work (a stop waits for more: ``_finish_in_flight``)."""
        for future in list(self._pending):
            if future.done() and not future.cancelled() and future.exception() is None:
                yield from self._emit(future)
        self._progress.flush()

    def _count(self, outcome: Outcome):
        """Metrics (in the bundle thread, where Beam keeps them), the live figures of a local
        run and a periodic log line."""
        retries = (caption_retries(outcome.caption["caption_meta"]) if outcome.caption
                   else max(outcome.attempts - 1, 0))
        if retries:  # a Beam counter update costs microseconds: only those that count
            self._retries.inc(retries)
            self._done["retries"] += retries
        throttled_ms = int(outcome.throttled_s * 1000)
        if throttled_ms:
            self._throttled_ms.inc(throttled_ms)
            self._throttled_in_bundle_ms += throttled_ms
        self._log_progress()
        if outcome.failure is not None:
            self._failed.inc()
            self._done["failed"] += 1
            paid = outcome.failure["error"].get("paid") or {}
            if paid:  # what its answered attempts cost
                self._prompt_tokens.inc(paid["prompt_tokens"])
                self._completion_tokens.inc(paid["completion_tokens"])
            self._progress.add(failed=1, throttled_ms=throttled_ms,
                               prompt_tokens=paid.get("prompt_tokens", 0),
                               completion_tokens=paid.get("completion_tokens", 0))
            error = outcome.failure["error"]
            _LOG.debug("%s failed: %s/%s after %d attempts: %s", outcome.failure["key"],
                       error["stage"], error["type"], error["attempts"], error["message"])
            return
        assert outcome.caption is not None  # an Outcome holds a caption or a failure
        self._count_caption(outcome.caption, throttled_ms)

    def _count_caption(self, caption: dict, throttled_ms: int) -> None:
        """_count's figures of a captioned record."""
        meta = caption["caption_meta"]
        images = caption.get(self._image_key)
        image_count = len(images) if isinstance(images, list) else 1  # as summary.json counts
        self._done["captioned"] += 1
        self._captioned.inc()
        self._images.inc(image_count)
        self._prompt_tokens.inc(meta["prompt_tokens"] or 0)
        self._completion_tokens.inc(meta["completion_tokens"] or 0)
        if meta["reasoning_tokens"]:
            self._reasoning_tokens.inc(meta["reasoning_tokens"])
        self._latency.update(int(meta["latency_ms"]))
        if meta["cached"]:  # summary.json counts a cached answer's tokens as saved, not spent
            self._progress.add(captioned=1, images=image_count, throttled_ms=throttled_ms)
        else:
            self._progress.add(captioned=1, images=image_count, throttled_ms=throttled_ms,
                               prompt_tokens=meta["prompt_tokens"] or 0,
                               completion_tokens=meta["completion_tokens"] or 0)

    def _log_progress(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= PROGRESS_LOG_S:
            self._logged_at = now
            _LOG.info("worker: %(captioned)d captioned, %(failed)d failed, %(retries)d retries "
                      "since it started", self._done)


class CaptionImages(beam.PTransform):
    """Caption keyed record elements (from ReadManifests).

    Returns ``{CAPTIONS: PCollection[dict], FAILURES: PCollection[dict], STATS:
    PCollection[dict]}`` (see core/records.py).
    """

    def __init__(self, config: WorkerConfig, spent_before: beam.PCollection | None = None,
                 progress_dir: str | None = None, copy_images: bool = False):
        """``spent_before``: a one-element PCollection, the dollars earlier runs spent (the cost
        of the captions a --resume reuses), counted against --max_cost. ``progress_dir``: where
        a local run's workers leave their figures for the live progress (core/figures.py).
        ``copy_images``: each caption carries its images' bytes (records.IMAGE_BYTES)."""
        super().__init__()
        self._config = config
        self._spent_before = spent_before
        self._progress_dir = progress_dir
        self._copy_images = copy_images

    def expand(self, records: beam.PCollection[dict]) -> dict[str, beam.PCollection[dict]]:
        side = ({"spent_before": beam.pvalue.AsSingleton(self._spent_before)}
                if self._spent_before is not None else {})
        captioner = _CaptionRecords(self._config, shared.Shared(), self._progress_dir,
                                    self._copy_images)
        results = records | "Caption" >> beam.ParDo(captioner, **side).with_outputs(
            FAILURES, STATS, main=CAPTIONS)
        return {CAPTIONS: results[CAPTIONS], FAILURES: results[FAILURES], STATS: results[STATS]}
