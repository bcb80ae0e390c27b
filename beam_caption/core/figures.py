"""Live progress, worker side: each process's running figures, written to files the launcher
sums (cli/progress.py).

In the bundle thread, DoFns call ``figures_for(progress_dir).add(captioned=1, ...)`` for each
finished record (a record skipped by ``--resume``: ``add(resumed=1)``), and ``flush()`` at the
end of each bundle. Each process keeps one running total per directory, shared by its DoFns,
and writes it atomically to ``DIR/<pid>-<random>.json`` at most every WRITE_INTERVAL_S (and on
flush). With ``progress_dir`` None (cluster runs, ``--no_progress``) ``add`` does nothing:
there the Beam metrics carry the same figures. ``read_totals`` sums a directory's files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import secrets
import threading

WRITE_INTERVAL_S = 0.5  # a worker process writes its figures at most this often
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
