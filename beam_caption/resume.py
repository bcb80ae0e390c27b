"""Checkpoints and resume: finished captions survive a crash or Ctrl-C and are not paid twice.

While a job runs, workers append finished captions to ``OUTDIR/.checkpoint/`` in small
files (a new file per flush, so a kill loses at most the unflushed ones). Final outputs are
written by ``WriteToText`` only when the job ends. ``--resume`` treats every caption found in
``captions-*.jsonl`` or ``.checkpoint/`` as done: it emits it again (once per key) into the
new final outputs and captions only the other records. Earlier final caption files are moved
into ``.checkpoint/`` before the run, earlier failure files are dropped (those records are
retried), and ``.checkpoint/`` is removed once the new outputs are complete.
"""

from __future__ import annotations

import json
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_caption.errors import UsageError
from beam_caption.sinks import (CAPTIONS_PREFIX, FAILURES_PREFIX, SUMMARY_FILE, output_path,
                                to_json_line)

CHECKPOINT_DIR = ".checkpoint"
CHECKPOINT_MAX_LINES = 1000


def _match(pattern: str) -> list[str]:
    return [m.path for result in FileSystems.match([pattern]) for m in result.metadata_list]


def existing_outputs(output_dir: str) -> list[str]:
    """Caption, failure, summary and checkpoint files already in ``output_dir``."""
    patterns = [f"{CAPTIONS_PREFIX}-*.jsonl", f"{FAILURES_PREFIX}-*.jsonl", SUMMARY_FILE,
                f"{CHECKPOINT_DIR}/*.jsonl"]
    return sorted(p for pattern in patterns for p in _match(output_path(output_dir, pattern)))


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool) -> bool:
    """Make ``output_dir`` ready for a run; returns whether there are captions to resume from.

    A directory holding earlier outputs is refused unless --resume or --overwrite says what
    to do with them, so a typo never destroys paid-for captions.
    """
    found = existing_outputs(output_dir)
    if not found:
        return False
    if overwrite:
        FileSystems.delete(found)
        return False
    if not resume:
        raise UsageError(f"{output_dir} already holds outputs of an earlier run ({len(found)} "
                         "files): pass --resume to keep its captions and do the rest, or "
                         "--overwrite to start again")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    finals = _match(output_path(output_dir, f"{CAPTIONS_PREFIX}-*.jsonl"))
    folder = output_path(output_dir, CHECKPOINT_DIR)
    if finals and not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    FileSystems.rename(finals, [checkpoint_path(output_dir, f"final-{stamp}-{path.rsplit('/', 1)[-1]}")
                                for path in finals])
    stale = _match(output_path(output_dir, f"{FAILURES_PREFIX}-*.jsonl"))
    stale += _match(output_path(output_dir, SUMMARY_FILE))
    if stale:
        FileSystems.delete(stale)
    return bool(_match(checkpoint_path(output_dir, "*.jsonl")))


def checkpoint_path(output_dir: str, name: str) -> str:
    return output_path(output_dir, f"{CHECKPOINT_DIR}/{name}")


def clear_checkpoints(output_dir: str) -> None:
    """Remove ``.checkpoint/`` once the final outputs hold every caption."""
    files = _match(checkpoint_path(output_dir, "*"))
    if files:
        FileSystems.delete(files)
    folder = output_path(output_dir, CHECKPOINT_DIR)
    if FileSystems.exists(folder):  # a local folder; object stores have none left
        FileSystems.delete([folder])


class CheckpointWriter:
    """Buffers finished captions and writes them to a new checkpoint file per flush."""

    def __init__(self, output_dir: str, interval_s: float):
        self._output_dir = output_dir
        self._interval_s = interval_s
        self._lines: list[str] = []
        self._last_flush = time.monotonic()

    def add(self, caption: dict) -> None:
        self._lines.append(to_json_line(caption))
        if (len(self._lines) >= CHECKPOINT_MAX_LINES
                or time.monotonic() - self._last_flush >= self._interval_s):
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._lines:
            return
        path = checkpoint_path(self._output_dir, f"part-{uuid.uuid4().hex}.jsonl")
        with FileSystems.create(path) as handle:
            handle.write(("\n".join(self._lines) + "\n").encode("utf-8"))
        self._lines = []


def _done_by_key(line: str):
    """(key, caption record) from a caption line; torn or foreign lines are skipped."""
    try:
        caption = json.loads(line)
        key = caption["caption_meta"]["key"]
    except (ValueError, KeyError, TypeError):
        return []
    return [(key, caption)]


def _split(grouped, todo_tag: str):
    """One output per record still in the input: its earlier caption, else the record to do."""
    _, groups = grouped
    records, done = list(groups["records"]), list(groups["done"])
    if records and done:
        yield done[0]
    elif records:
        yield beam.pvalue.TaggedOutput(todo_tag, records[0])


class SkipDone(beam.PTransform):
    """Split records into those captioned by an earlier run (re-emitted once) and the rest.

    Returns ``{"done": PCollection[caption dict], "todo": PCollection[record element]}``.
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, records):
        done = (records.pipeline
                | "ReadDone" >> beam.io.ReadFromText(checkpoint_path(self._output_dir, "*.jsonl"))
                | "KeyDone" >> beam.FlatMap(_done_by_key))
        keyed = records | "KeyRecords" >> beam.Map(lambda element: (element["key"], element))
        split = ({"records": keyed, "done": done}
                 | "Join" >> beam.CoGroupByKey()
                 | "Split" >> beam.FlatMap(_split, "todo").with_outputs("todo", main="done"))
        return {"done": split.done, "todo": split.todo}
