"""The output directory before a run: refused when it holds earlier outputs without
``--resume``/``--overwrite``; with ``--resume`` earlier final caption shards (and set-aside ones)
are moved into ``.checkpoint/`` (transforms/skip_done.py reads them), earlier failure files and
the summary are dropped (those records are retried). Only files with the project's exact names
are moved or deleted (outputs.is_shard_name, checkpoint.is_checkpoint_name); a failed job's
temp files are removed (``remove_temp_files``).
"""

from __future__ import annotations

import glob
import logging
import time

import fsspec
from apache_beam.io.filesystems import FileSystems

from beam_caption.core.errors import UsageError
from beam_caption.core.ledger import LEDGER_DIR
from beam_caption.core.outputs import (
    CAPTIONS_PREFIX,
    FAILURES_PREFIX,
    REPORT_FILE,
    SET_ASIDE_PREFIX,
    SHARDS,
    SUMMARY_FILE,
    shard_paths,
)
from beam_caption.transforms.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_files,
    checkpoint_path,
    final_name,
)
from beam_caption.transforms.write import match_files, output_path

BEAM_TEMP_PATTERN = "beam-temp-*"  # WriteToText's temp folders, renamed away at finalize

_LOG = logging.getLogger(__name__)


def _shards(output_dir: str, prefix: str) -> list[str]:
    """``prefix``'s shard files in ``output_dir`` (exact names: no look-alike file)."""
    return shard_paths(match_files(output_path(output_dir, f"{prefix}{SHARDS}")), prefix)


def existing_outputs(output_dir: str, captions_prefix: str = CAPTIONS_PREFIX) -> list[str]:
    """The project's caption (``captions_prefix``), failure, set-aside, summary, report,
    checkpoint and ledger files already in ``output_dir`` (``damaged/`` is never among them:
    nothing deletes it)."""
    found = [path for prefix in (captions_prefix, FAILURES_PREFIX, SET_ASIDE_PREFIX)
             for path in _shards(output_dir, prefix)]
    for pattern in (SUMMARY_FILE, REPORT_FILE, f"{CHECKPOINT_DIR}/*", f"{LEDGER_DIR}/*"):
        found += match_files(output_path(output_dir, pattern))
    return sorted(found)


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool,
                       captions_prefix: str = CAPTIONS_PREFIX) -> bool:
    """Make ``output_dir`` ready for a run; returns whether there are captions to resume from.

    A directory holding earlier outputs is refused unless --resume or --overwrite says what
    to do with them, so a typo never destroys paid-for captions. With --resume the earlier
    caption and set-aside shards are moved into the checkpoint folder (read from there, on this
    try and any later one, until a run completes), then the earlier failures and summary are
    dropped. ``captions_prefix`` names the caption shards (a recipe's --file_name_prefix); they
    are moved aside under the default name, which is what resume reads.
    """
    if glob.has_magic(output_dir) or "{" in output_dir:
        raise UsageError(f"--output {output_dir!r} holds a glob character (*, ?, [ or {{): Beam's "
                         "file sinks read it as a pattern and fail at the end of the job, after "
                         "every request is paid; choose a directory name without them")
    found = existing_outputs(output_dir, captions_prefix)
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
    finals = {path: CAPTIONS_PREFIX + path.rsplit("/", 1)[-1][len(captions_prefix):]
              for path in _shards(output_dir, captions_prefix)}
    finals.update((path, path.rsplit("/", 1)[-1])
                  for path in _shards(output_dir, SET_ASIDE_PREFIX))
    folder = output_path(output_dir, CHECKPOINT_DIR)
    if finals and not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    FileSystems.rename(list(finals), [
        checkpoint_path(output_dir, final_name(stamp, name)) for name in finals.values()])
    stale = _shards(output_dir, FAILURES_PREFIX) + match_files(
        output_path(output_dir, SUMMARY_FILE))
    if stale:
        FileSystems.delete(stale)
    return bool(checkpoint_files(output_dir))


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
