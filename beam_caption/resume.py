"""Checkpoints and resume: finished captions survive a crash or Ctrl-C and are not paid twice.

While a job runs, workers append finished captions to ``OUTDIR/.checkpoint/`` in small
files (a new file per flush, so a kill loses at most the unflushed ones). Final outputs are
written by ``WriteToText`` only when the job ends.

A caption is reused only for the same record content under the same request settings: each
caption carries ``caption_meta.fingerprint``, a SHA-256 of the record as read and of every
setting that shapes its answer (model, prompts, image preparation, sampling). ``--resume``
joins the records on it, so inserted, moved, edited or dropped records and changed settings
never get another record's caption. Earlier final caption files (and earlier set-aside ones)
are moved into ``.checkpoint/`` before the run; captions this run does not reuse are written
to ``set_aside-*.jsonl`` (a later ``--resume`` may still reuse them), never deleted. Earlier
failure files are dropped (those records are retried), and ``.checkpoint/`` is removed once the
new outputs are complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time

import apache_beam as beam
import fsspec
from apache_beam.io.filesystems import FileSystems

from beam_caption.batch_ledger import LEDGER_DIR
from beam_caption.checkpoint import CHECKPOINT_DIR, checkpoint_path
from beam_caption.errors import UsageError
from beam_caption.outputs import (
    CAPTIONS_PREFIX,
    FAILURES_PREFIX,
    REPORT_FILE,
    SET_ASIDE_PREFIX,
    SHARDS,
    SUMMARY_FILE,
    line_element,
)
from beam_caption.progress import figures_for
from beam_caption.sinks import match_files, output_path

SET_ASIDE = "set_aside"
BEAM_TEMP_PATTERN = "beam-temp-*"  # WriteToText's temp folders, renamed away at finalize

_LOG = logging.getLogger(__name__)


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def record_fingerprint(record: dict, settings_digest: str) -> str:
    """What a caption answers: the record's content under the settings that shape the answer."""
    canonical = _CANONICAL_JSON.encode([settings_digest, record])
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def keyed_by_fingerprint(element: dict, digest: str) -> tuple[str, dict]:
    """(fingerprint of its record, element) for an element holding a ``record`` (a keyed
    record, a failure), to join it with captions or answers of the same content."""
    return record_fingerprint(element["record"], digest), element


def settings_digest(settings: dict) -> str:
    """A digest of the request settings (JSON-serializable values) that shape every answer."""
    return hashlib.sha256(_CANONICAL_JSON.encode(settings).encode("ascii")).hexdigest()


def existing_outputs(output_dir: str) -> list[str]:
    """Caption, failure, summary and checkpoint files already in ``output_dir``."""
    patterns = [f"{CAPTIONS_PREFIX}{SHARDS}", f"{FAILURES_PREFIX}{SHARDS}",
                f"{SET_ASIDE_PREFIX}{SHARDS}", SUMMARY_FILE, REPORT_FILE, f"{CHECKPOINT_DIR}/*",
                f"{LEDGER_DIR}/*"]
    return sorted(p for pattern in patterns for p in match_files(output_path(output_dir, pattern)))


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool) -> bool:
    """Make ``output_dir`` ready for a run; returns whether there are captions to resume from.

    A directory holding earlier outputs is refused unless --resume or --overwrite says what
    to do with them, so a typo never destroys paid-for captions.
    """
    if glob.has_magic(output_dir) or "{" in output_dir:
        raise UsageError(f"--output {output_dir!r} holds a glob character (*, ?, [ or {{): Beam's "
                         "file sinks read it as a pattern and fail at the end of the job, after "
                         "every request is paid; choose a directory name without them")
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
    finals = [path for prefix in (CAPTIONS_PREFIX, SET_ASIDE_PREFIX)
              for path in match_files(output_path(output_dir, f"{prefix}{SHARDS}"))]
    folder = output_path(output_dir, CHECKPOINT_DIR)
    if finals and not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    FileSystems.rename(finals, [
        checkpoint_path(output_dir, f"final-{stamp}-{path.rsplit('/', 1)[-1]}") for path in finals])
    stale = match_files(output_path(output_dir, f"{FAILURES_PREFIX}{SHARDS}"))
    stale += match_files(output_path(output_dir, SUMMARY_FILE))
    if stale:
        FileSystems.delete(stale)
    return bool(match_files(checkpoint_path(output_dir, "*")))


def remove_temp_files(output_dir: str) -> None:
    """Delete the temp folders a failed or interrupted job left in ``output_dir`` (a full disk
    stays full otherwise); checkpoints are kept for --resume."""
    try:
        fs, root = fsspec.core.url_to_fs(output_dir)
        temp = fs.glob(f"{root.rstrip('/')}/{BEAM_TEMP_PATTERN}")
        if temp:
            fs.rm(temp, recursive=True)
    except Exception as exc:  # cleaning up must not hide the error that stopped the job
        _LOG.warning("could not remove temp files in %s: %s", output_dir, exc)


def _done_by_fingerprint(line: str):
    """(fingerprint, caption record) from a caption line; torn or foreign lines are skipped,
    and captions made before fingerprints existed go under None (they are set aside)."""
    try:
        caption = line_element(line)  # a JSON-lines line, or an element line of a JSON array
        meta = caption["caption_meta"]  # type: ignore[index]
        meta["key"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return []
    fingerprint = meta.get("fingerprint")
    return [(fingerprint if isinstance(fingerprint, str) else None, caption)]


def _split(grouped, todo_tag: str, set_aside_tag: str):
    """Each record gets an earlier caption of the same fingerprint (its own key's first) or goes
    to ``todo``; earlier captions left over go to ``set_aside``, one per earlier key."""
    _, groups = grouped
    done = list({caption["caption_meta"]["key"]: caption for caption in groups["done"]}.values())
    records = sorted(groups["records"], key=lambda element: element["key"])
    by_key = {caption["caption_meta"]["key"]: caption for caption in done}
    unmatched = [r for r in records if r["key"] not in by_key]
    used = {r["key"] for r in records if r["key"] in by_key}
    spare = [caption for key, caption in by_key.items() if key not in used]
    for record in records:
        if record["key"] in used:
            yield by_key[record["key"]]
    for record, caption in zip(unmatched, spare, strict=False):  # the shorter one is used up
        yield {**caption, "caption_meta": {**caption["caption_meta"], "key": record["key"]}}
    for record in unmatched[len(spare):]:
        yield beam.pvalue.TaggedOutput(todo_tag, record)
    for caption in spare[len(unmatched):]:
        yield beam.pvalue.TaggedOutput(set_aside_tag, caption)


class _Split(beam.DoFn):
    """``_split`` in a DoFn that counts the records it finds done in the live progress."""

    def __init__(self, progress_dir: str | None):
        self._progress_dir = progress_dir

    def setup(self):
        self._figures = figures_for(self._progress_dir)

    def process(self, grouped):
        for output in _split(grouped, "todo", SET_ASIDE):
            if not isinstance(output, beam.pvalue.TaggedOutput):
                self._figures.add(resumed=1)
            yield output

    def finish_bundle(self):
        self._figures.flush()


class SkipDone(beam.PTransform):
    """Split records into those captioned by an earlier run (re-emitted once) and the rest.

    ``settings_digest`` is the digest of this run's answer settings (``record_fingerprint``).
    Returns ``{"done": PCollection[caption dict], "todo": PCollection[record element],
    "set_aside": PCollection[caption dict]}``: set_aside holds the earlier captions that no
    record of this run may reuse (other content or settings, or a manifest left out).
    """

    def __init__(self, output_dir: str, settings_digest: str, progress_dir: str | None = None):
        super().__init__()
        self._output_dir = output_dir
        self._settings_digest = settings_digest
        self._progress_dir = progress_dir

    def expand(self, records):
        digest = self._settings_digest
        done = _read_done(records.pipeline, self._output_dir)
        keyed = records | "KeyRecords" >> beam.Map(keyed_by_fingerprint, digest)
        split = ({"records": keyed, "done": done}
                 | "Join" >> beam.CoGroupByKey()
                 | "Split" >> beam.ParDo(_Split(self._progress_dir)).with_outputs(
                     "todo", SET_ASIDE, main="done"))
        return {"done": split.done, "todo": split.todo, "set_aside": split.set_aside}


def _read_done(pipeline: beam.Pipeline, output_dir: str) -> beam.PCollection:
    """(fingerprint, caption) of the checkpointed captions: checkpoint parts and earlier final
    files in any output format (matched when the graph is built, at launch)."""
    files = match_files(checkpoint_path(output_dir, "*"))
    sources = []
    if any(not path.endswith(".parquet") for path in files):
        sources.append(pipeline
                       | "ReadDone" >> beam.io.ReadFromText(checkpoint_path(output_dir, "*.json*"))
                       | "KeyDone" >> beam.FlatMap(_done_by_fingerprint))
    if any(path.endswith(".parquet") for path in files):
        sources.append(pipeline
                       | "ReadDoneParquet" >> beam.io.ReadFromParquet(
                           checkpoint_path(output_dir, "*.parquet"), columns=["line"])
                       | "KeyDoneParquet" >> beam.FlatMap(lambda row: _done_by_fingerprint(
                           row["line"])))
    if not sources:
        return pipeline | "NothingDone" >> beam.Create([])
    return sources[0] if len(sources) == 1 else sources | "AllDone" >> beam.Flatten()
