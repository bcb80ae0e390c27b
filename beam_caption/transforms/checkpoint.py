"""Checkpoints: finished captions saved while the job runs, so a crash or stop keeps paid work.

``CheckpointCaptions`` is its own step right after captioning (it fuses into the same stage):
it passes captions through and appends them to ``OUTDIR/.checkpoint/`` in small files, a new
file per flush (every ``--checkpoint_interval`` seconds, every CHECKPOINT_MAX_LINES captions,
at the end of each bundle, when the step is torn down (after a failed bundle: a stop), and on
the way out of a process). ``--resume`` moves the earlier final files there too (``final_name``)
and reads them all back (skip_done.py); the launcher removes them once the final outputs are
complete. Only files with these names are read or deleted (``checkpoint_files``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
import weakref

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_caption.core.outputs import CAPTIONS_PREFIX, SET_ASIDE_PREFIX, is_shard_name
from beam_caption.transforms.write import match_files, output_path, to_json_line

CHECKPOINT_DIR = ".checkpoint"
CHECKPOINT_MAX_LINES = 1000
PART_PREFIX = "part-"  # a checkpoint file: part-HEX.jsonl
FINAL_PREFIX = "final-"  # an earlier final file moved aside: final-STAMP-SHARD

_LOG = logging.getLogger(__name__)


def checkpoint_path(output_dir: str, name: str) -> str:
    return output_path(output_dir, f"{CHECKPOINT_DIR}/{name}")


def final_name(stamp: str, shard_name: str) -> str:
    """The name in ``.checkpoint/`` of an earlier final shard moved aside at ``stamp``."""
    return f"{FINAL_PREFIX}{stamp}-{shard_name}"


def is_checkpoint_name(name: str) -> bool:
    """Whether the file name ``name`` is one the project writes in ``.checkpoint/``."""
    if name.startswith(PART_PREFIX):
        return name.endswith(".jsonl")
    shard = name.removeprefix(FINAL_PREFIX).partition("-")[2]
    return name.startswith(FINAL_PREFIX) and any(
        is_shard_name(shard, prefix) for prefix in (CAPTIONS_PREFIX, SET_ASIDE_PREFIX))


def checkpoint_files(output_dir: str) -> list[str]:
    """The checkpoint parts and earlier final files in ``output_dir``'s checkpoint folder."""
    return [path for path in match_files(checkpoint_path(output_dir, "*"))
            if is_checkpoint_name(path.rsplit("/", 1)[-1])]


def clear_checkpoints(output_dir: str) -> None:
    """Remove the checkpoint files once the final outputs hold every caption, and the folder
    when nothing else is left in it."""
    files = checkpoint_files(output_dir)
    if files:
        FileSystems.delete(files)
    folder = output_path(output_dir, CHECKPOINT_DIR)
    # A local folder (object stores have none left), deleted only when empty.
    if FileSystems.exists(folder) and not match_files(checkpoint_path(output_dir, "*")):
        FileSystems.delete([folder])


class CheckpointWriter:
    """Buffers finished captions and writes them to a new checkpoint file per flush.

    What is still buffered when the process exits (Ctrl-C, SIGTERM, a stopped job) is written
    on the way out; a kill loses at most ``interval_s`` of captions.
    """

    def __init__(self, output_dir: str, interval_s: float):
        self._output_dir = output_dir
        self._interval_s = interval_s
        self._lines: list[str] = []
        self._last_flush = time.monotonic()
        weakref.finalize(self, _write_lines, output_dir, self._lines)

    def add(self, caption: dict) -> None:
        self._lines.append(to_json_line(caption))
        if (len(self._lines) >= CHECKPOINT_MAX_LINES
                or time.monotonic() - self._last_flush >= self._interval_s):
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        _write_lines(self._output_dir, self._lines)


def _write_lines(output_dir: str, lines: list[str]) -> None:
    """Write ``lines`` to a new checkpoint file and empty the list; on failure (e.g. a full
    disk) drop the torn file and keep the lines for the next try."""
    if not lines:
        return
    path = checkpoint_path(output_dir, f"{PART_PREFIX}{uuid.uuid4().hex}.jsonl")
    try:
        with FileSystems.create(path) as handle:
            handle.write(("\n".join(lines) + "\n").encode("utf-8"))
    except Exception as exc:
        _LOG.warning("checkpoint write to %s failed (%s: %s); retrying at the next flush",
                     path, type(exc).__name__, exc)
        _delete_quietly(path)
        return
    del lines[:]  # in place: the exit-time finalizer holds the same list


def _delete_quietly(path: str) -> None:
    with contextlib.suppress(Exception):  # nothing was left, or it cannot be deleted either
        FileSystems.delete([path])


class _CheckpointCaptions(beam.DoFn):
    def __init__(self, output_dir: str, interval_s: float):
        self._output_dir = output_dir
        self._interval_s = interval_s

    def setup(self):
        self._writer = CheckpointWriter(self._output_dir, self._interval_s)

    def process(self, caption: dict):
        self._writer.add(caption)
        yield caption

    def finish_bundle(self):
        self._writer.flush()

    def teardown(self):
        """A bundle that failed (a stop: JobStopped, after the captioning step emitted its
        answers in flight) gets no finish_bundle, but Beam tears its DoFns down before it
        reports the failure: write what is buffered now, not when the writer is collected."""
        self._writer.flush()


class CheckpointCaptions(beam.PTransform):
    """Save captions to ``output_dir``'s checkpoint folder as they pass; returns them unchanged."""

    def __init__(self, output_dir: str, interval_s: float = 10.0):
        super().__init__()
        self._output_dir = output_dir
        self._interval_s = interval_s

    def expand(self, captions: beam.PCollection[dict]) -> beam.PCollection[dict]:
        return captions | "Checkpoint" >> beam.ParDo(
            _CheckpointCaptions(self._output_dir, self._interval_s))
