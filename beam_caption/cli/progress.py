"""Live progress of a local run, launcher side: the workers' figures (core/figures.py) shown.

``with live_progress(manifest_files) as progress_dir:`` makes a temporary directory for the
job's workers and sums its files every REFRESH_S into a tqdm bar on stderr when stderr is a
terminal, else into an INFO line of the ``beam_caption.progress`` logger every LOG_INTERVAL_S
(``BEAM_CAPTION_PROGRESS_LOG_S`` in the environment overrides it) and once more when the job
has finished. The total comes from counting the manifests' records in the background; until
counted (or when counting fails) there is no total and no ETA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from beam_caption.core.figures import read_totals
from beam_caption.core.inputs import count_elements

REFRESH_S = 0.5  # the bar is redrawn this often
LOG_INTERVAL_S = 30.0  # without a terminal, a progress line this often
LOG_INTERVAL_ENV = "BEAM_CAPTION_PROGRESS_LOG_S"  # overrides LOG_INTERVAL_S (tests)

_LOG = logging.getLogger("beam_caption.progress")  # the name progress lines show




def count_records(files: list[str]) -> int:
    """How many elements ReadManifests makes of ``files`` (records and read failures): non-blank
    lines of JSONL, items of JSON arrays, samples of shards, rows of tables. Raises what
    reading a file raises."""
    return sum(count_elements(file) for file in files)


def log_interval_s() -> float:
    """Seconds between progress lines without a terminal: LOG_INTERVAL_ENV's, else
    LOG_INTERVAL_S."""
    return float(os.environ.get(LOG_INTERVAL_ENV) or LOG_INTERVAL_S)


class ProgressDisplay:
    """Shows the summed figures of ``progress_dir`` on ``stream`` from start() to stop(): a tqdm
    bar when ``stream`` is a terminal, else an INFO log line every ``log_interval`` seconds
    (default: ``log_interval_s()``). ``manifest_files`` are counted for the total."""

    def __init__(self, progress_dir: str, manifest_files: list[str],
                 stream: IO[str] | None = None, log_interval: float | None = None):
        self._dir = progress_dir
        self._files = list(manifest_files)
        self._stream = stream or sys.stderr
        self._is_terminal = self._stream.isatty()
        self._interval = (REFRESH_S if self._is_terminal else
                          log_interval if log_interval is not None else log_interval_s())
        self._total: int | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._show_until_stopped, daemon=True,
                                        name="beam_caption-progress")
        self._bar: tqdm | None = None
        self._restore = contextlib.ExitStack()
        self._started_at = time.monotonic()

    def start(self) -> None:
        """Count the total and show the figures, both in the background."""
        threading.Thread(target=self._count_total, daemon=True,
                         name="beam_caption-count").start()
        if self._is_terminal:
            self._bar = tqdm(desc="captioning", unit="rec", file=self._stream, smoothing=0,
                             dynamic_ncols=True, mininterval=0)
            self._restore.enter_context(logging_redirect_tqdm())  # log lines above the bar
        elif _LOG.level == logging.NOTSET and not _LOG.isEnabledFor(logging.INFO):
            _LOG.setLevel(logging.INFO)  # the CLI's root level is WARNING
            self._restore.callback(_LOG.setLevel, logging.NOTSET)
        self._thread.start()

    def stop(self, final_figures: bool = True) -> None:
        """Stop showing and close the bar, first showing the final figures unless told not to
        (a job that failed ends with its one error line)."""
        self._stopped.set()
        self._thread.join()
        if final_figures:
            self._show()
        if self._bar is not None:
            self._bar.close()
        self._restore.close()

    def _count_total(self) -> None:
        try:
            self._total = count_records(self._files)
        except Exception as exc:  # no total is all a failed count costs
            _LOG.debug("manifest records not counted: %s", exc)

    def _show_until_stopped(self) -> None:
        while not self._stopped.wait(self._interval):
            self._show()

    def _show(self) -> None:
        figures = read_totals(self._dir)
        elapsed = max(time.monotonic() - self._started_at, 1e-9)
        if self._bar is None:
            _LOG.info("%s", progress_line(figures, self._total, elapsed))
            return
        bar = self._bar
        bar.total = self._total
        bar.initial = figures["resumed"]  # resumed records take no time: kept out of the rate
        bar.n = done_records(figures)
        bar.set_postfix_str(figures_text(figures, elapsed), refresh=False)
        bar.refresh()


def done_records(figures: dict[str, int]) -> int:
    """Records with an outcome: captioned, failed or resumed."""
    return figures["captioned"] + figures["failed"] + figures["resumed"]


def figures_text(figures: dict[str, int], elapsed: float) -> str:
    """What the bar shows after its rate: images/s, failures, tokens, throttled time."""
    resumed = f", {figures['resumed']:,} resumed" if figures["resumed"] else ""
    tokens = figures["prompt_tokens"] + figures["completion_tokens"]
    return (f"{figures['images'] / elapsed:.1f} img/s, {figures['failed']:,} failed{resumed}, "
            f"{tokens:,} tokens, {figures['throttled_ms'] / 1000:.1f} s throttled")


def progress_line(figures: dict[str, int], total: int | None, elapsed: float) -> str:
    """The plain progress line: done of total, rate, the bar's figures and the ETA."""
    done = done_records(figures)
    rate = (figures["captioned"] + figures["failed"]) / elapsed  # resumed ones take no time
    records = (f"{done:,} records" if total is None else
               f"{done:,}/{total:,} records ({done / max(total, 1):.0%})")
    line = f"progress: {records}, {rate:.1f} rec/s, {figures_text(figures, elapsed)}"
    if total is not None and rate and done < total:
        line += f", ETA {tqdm.format_interval((total - done) / rate)}"
    return line


@contextlib.contextmanager
def live_progress(manifest_files: list[str]) -> Iterator[str]:
    """A temporary progress directory for a local job's workers, shown on stderr while the
    block runs (see the module); the final figures only when the block succeeds."""
    with tempfile.TemporaryDirectory(prefix="beam_caption-progress-",
                                     ignore_cleanup_errors=True) as progress_dir:
        display = ProgressDisplay(progress_dir, manifest_files)
        display.start()
        try:
            yield progress_dir
        except BaseException:  # Ctrl-C, a stop or an error: the CLI's one line comes next
            display.stop(final_figures=False)
            raise
        display.stop()
