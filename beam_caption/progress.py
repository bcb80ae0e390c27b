"""Live progress of a local run: workers leave running figures in files, the launcher shows them.

Worker side (DoFns, in the bundle thread): ``figures_for(progress_dir).add(captioned=1, ...)``
for each finished record (a record skipped by ``--resume``: ``add(resumed=1)``), and ``flush()``
at the end of each bundle. Each process keeps one running total per directory, shared by its
DoFns, and writes it atomically to ``DIR/<pid>-<random>.json`` at most every WRITE_INTERVAL_S
(and on flush). With ``progress_dir`` None (cluster runs, ``--no_progress``) ``add`` does
nothing: there the Beam metrics carry the same figures.

Launcher side: ``with live_progress(manifest_files) as progress_dir:`` makes a temporary
directory for the job's workers and sums its files every REFRESH_S into a tqdm bar on stderr when
stderr is a terminal, else into an INFO line of the ``beam_caption.progress`` logger every
LOG_INTERVAL_S (``BEAM_CAPTION_PROGRESS_LOG_S`` in the environment overrides it) and once more
when the job has finished. The total comes from counting the manifests' records in the
background; until counted (or when counting fails) there is no total and no ETA.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO

import fsspec
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

WRITE_INTERVAL_S = 0.5  # a worker process writes its figures at most this often
REFRESH_S = 0.5  # the bar is redrawn this often
LOG_INTERVAL_S = 30.0  # without a terminal, a progress line this often
LOG_INTERVAL_ENV = "BEAM_CAPTION_PROGRESS_LOG_S"  # overrides LOG_INTERVAL_S (tests)
FIELDS = ("captioned", "failed", "resumed", "images", "prompt_tokens", "completion_tokens",
          "throttled_ms")

_LOG = logging.getLogger(__name__)


class ProcessFigures:
    """One process's running totals for one progress directory (see the module); thread-safe."""

    def __init__(self, progress_dir: str | None):
        self._path = (None if progress_dir is None else
                      os.path.join(progress_dir, f"{os.getpid()}-{secrets.token_hex(4)}.json"))
        self._totals = dict.fromkeys(FIELDS, 0)
        self._written = dict(self._totals)
        self._lock = threading.Lock()  # guards _totals and _write_pending
        self._write_lock = threading.Lock()  # one write at a time, each newer than the last
        self._write_pending = False

    def add(self, *, captioned: int = 0, failed: int = 0, resumed: int = 0, images: int = 0,
            prompt_tokens: int = 0, completion_tokens: int = 0, throttled_ms: int = 0) -> None:
        """Count finished records (``resumed``: skipped by ``--resume``) and what they took."""
        if self._path is None:
            return
        with self._lock:
            totals = self._totals
            totals["captioned"] += captioned
            totals["failed"] += failed
            totals["resumed"] += resumed
            totals["images"] += images
            totals["prompt_tokens"] += prompt_tokens
            totals["completion_tokens"] += completion_tokens
            totals["throttled_ms"] += throttled_ms
            if not self._write_pending:
                self._write_pending = True
                timer = threading.Timer(WRITE_INTERVAL_S, self.flush)
                timer.daemon = True
                timer.start()

    def flush(self) -> None:
        """Write the totals now if they changed since the last write."""
        if self._path is None:
            return
        with self._write_lock:
            with self._lock:
                totals, self._write_pending = dict(self._totals), False
            if totals == self._written:
                return
            try:
                _write_atomically(self._path, json.dumps(totals))
            except OSError as exc:  # the launcher removed the directory: the run is over
                _LOG.debug("progress figures not written: %s", exc)
                return
            self._written = totals


_FIGURES: dict[tuple[int, str | None], ProcessFigures] = {}
_FIGURES_LOCK = threading.Lock()


def figures_for(progress_dir: str | None) -> ProcessFigures:
    """This process's figures for ``progress_dir``, shared by all its DoFns; for None, figures
    that count nothing."""
    key = (os.getpid(), progress_dir)
    with _FIGURES_LOCK:
        figures = _FIGURES.get(key)
        if figures is None:
            figures = _FIGURES[key] = ProcessFigures(progress_dir)
        return figures


def _write_atomically(path: str, text: str) -> None:
    temp = f"{path}.tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temp, path)


def read_totals(progress_dir: str) -> dict[str, int]:
    """The figures of every process that wrote into ``progress_dir``, summed."""
    totals = dict.fromkeys(FIELDS, 0)
    for path in glob.glob(os.path.join(glob.escape(progress_dir), "*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                figures = json.load(handle)
        except (OSError, ValueError):
            continue
        for name in FIELDS:
            totals[name] += figures.get(name, 0)
    return totals


def count_records(files: list[str]) -> int:
    """How many elements ReadManifests makes of ``files`` (records and read failures): non-blank
    lines of JSONL, items of JSON arrays. Raises what reading a file raises."""
    return sum(_count_file_records(file) for file in files)


def _count_file_records(file: str) -> int:
    # Imported here: manifest.py imports this module for its workers' figures.
    from beam_caption.manifest import _BOM, _is_json_array, _iter_json_array, _lines

    with fsspec.open(file, "rb", compression="infer") as handle:
        if _is_json_array(file, handle):
            text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape")
            return sum(1 for _ in _iter_json_array(file, text))
        lines = (line.strip() for line, _ in _lines(handle))
        first = next(lines, b"").removeprefix(_BOM)
        return bool(first) + sum(1 for line in lines if line)


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
