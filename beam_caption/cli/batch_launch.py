"""Batch mode's launcher: submit, wait for the batches, resubmit failed requests, collect.

``--mode batch`` runs ``submit_and_wait`` before the job's graph: the records no batch of the
ledger holds yet are submitted (a Beam job: SubmitBatches; one record per fingerprint, the
others share its answer), then the launcher polls every batch of the ledger until it ends
(backoff up to ``--batch_poll_interval``, one progress line per poll; a batch not ended
``--batch_max_wait_hours`` after its upload ends as ``timeout``, a batch object without a
documented status as ``invalid``, each with one line; such a batch is cancelled through the API,
once, and its end awaited for at most CANCEL_WAIT_S to collect what it answered before the
cancel), and with ``--retry_failed`` or
``--resume`` (earlier failures are tried again, as online) submits once more the records the
batches left unanswered: a retry pass, whose ledger names hold the batches it retries.
The job's graph then collects (CollectBatchResults). ``collect`` (``python -m beam_caption
collect``) does the waiting and collecting only, submitting nothing.

Polling holds no worker: it runs in the launcher (or a later ``collect``), which may die and
be started again at any time; the ledger in ``OUTDIR/batches/`` says what was submitted.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable

import apache_beam as beam
import fsspec
from apache_beam.io.filesystems import FileSystems

from beam_caption.cli.flags import CaptionOptions, is_local_runner
from beam_caption.core.batch_api import BatchAPI, BatchAPIError, BatchState
from beam_caption.core.engine import WorkerConfig
from beam_caption.core.errors import JobStopped, StoppedError, UsageError
from beam_caption.core.identity import keyed_by_fingerprint
from beam_caption.core.ledger import (
    CANCEL_ASKED,
    CANCEL_ENDED,
    CANCEL_FAILED,
    FAILED_ENDS,
    UNSENT_PREFIX,
    LedgerEntry,
    ledger_dir,
    read_entries,
    read_entry,
    write_entry,
)
from beam_caption.core.records import RECORDS
from beam_caption.transforms.batch import SubmitBatches, result_file, result_lines
from beam_caption.transforms.manifests import ReadManifestFiles
from beam_caption.transforms.skip_done import SkipDone
from beam_caption.transforms.write import match_files

FIRST_POLL_S = 2.0
POLL_GROWTH = 1.5
RETRY_FILE = "retry-fingerprints.txt"
ADOPT_GRACE_S = 900.0  # on a cluster, an upload this young may still get its batch from its job
HOUR_S = 3600.0
CANCEL_WAIT_S = 900.0  # after a cancel, its end (with what it answered) is awaited this long


def submit_and_wait(options: CaptionOptions, files: list[str], config: WorkerConfig,
                    api_key: str | None, resume: bool,
                    new_pipeline: Callable[[CaptionOptions], beam.Pipeline],
                    collect_only: bool = False) -> None:
    """Submit what no batch holds yet (not when ``collect_only``), wait for every batch of the
    ledger to end, resubmit what they left unanswered once (``--retry_failed``, ``--resume``)
    and wait again."""
    out = options.output
    api = BatchAPI(config.client.api_url, api_key)
    grace = 0.0 if is_local_runner(options) else ADOPT_GRACE_S
    _adopt(api, out, grace)
    if not collect_only:
        _delete(f"{ledger_dir(out)}/{UNSENT_PREFIX}-*")  # those records are tried again
        _run_submit(new_pipeline(options), files, budgeted(config, options, out), options,
                    resume, None)
    max_wait = options.batch_max_wait_hours * HOUR_S
    entries = poll(api, out, options.batch_poll_interval, grace, max_wait)
    if (options.retry_failed or options.resume) and not collect_only:
        fingerprints, retried = unanswered(api, entries, options.batch_max_result_bytes)
        if fingerprints:
            path = f"{ledger_dir(out)}/{RETRY_FILE}"
            with fsspec.open(path, "wt", encoding="utf-8") as handle:
                handle.writelines(f"{json.dumps(fp)}\n" for fp in sorted(fingerprints))
            print(f"batch: submitting again the {len(fingerprints)} records the batches left "
                  "unanswered", file=sys.stderr)
            _run_submit(new_pipeline(options), files, budgeted(config, options, out), options,
                        resume, path, retry_of=",".join(sorted(retried)))
            poll(api, out, options.batch_poll_interval, grace, max_wait)


def budgeted(config: WorkerConfig, options: CaptionOptions, output_dir: str) -> WorkerConfig:
    """``config`` with each worker process's share of what --max_cost leaves once the ledger's
    batches are paid (at their largest possible cost)."""
    if not options.max_cost:
        return config
    spent = sum(entry.estimated_cost for entry in read_entries(output_dir))
    share = max(0.0, options.max_cost - spent) / (options.worker_processes or 1)
    return dataclasses.replace(config, client=dataclasses.replace(config.client, max_cost=share))


def _run_submit(pipeline: beam.Pipeline, files: list[str], config: WorkerConfig,
                options: CaptionOptions, resume: bool, only_keys: str | None,
                retry_of: str = "") -> None:
    """The submission job: the records to submit (not yet in a batch, or those of
    ``only_keys`` in the retry pass of the batches ``retry_of``) through SubmitBatches, one
    record per fingerprint."""
    out = options.output
    records = (pipeline | "ReadManifests" >> ReadManifestFiles(files))[RECORDS]
    if resume:
        records = (records | "SkipDone" >> SkipDone(out, config.settings_digest))["todo"]
    if only_keys:
        listed = (pipeline | "ReadFingerprints" >> beam.io.ReadFromText(only_keys)
                  | "ParseFingerprints" >> beam.Map(lambda line: (json.loads(line), None)))
        chosen = _join(records, listed, config.settings_digest, keep_listed=True)
    else:
        entries = match_files(f"{ledger_dir(out)}/*.json")
        covered = (pipeline | "Ledger" >> beam.Create(entries)
                   | "Covered" >> beam.FlatMap(_entry_fingerprints))
        chosen = _join(records, covered, config.settings_digest, keep_listed=False)
    chosen | "SubmitBatches" >> SubmitBatches(
        config, out, options.batch_max_requests, options.batch_max_bytes,
        time.strftime("%Y%m%dT%H%M%S"), retry_of)
    try:
        pipeline.run().wait_until_finish()
    except BaseException as exc:
        reason = JobStopped.find(str(exc))
        if reason is not None:
            raise StoppedError(reason) from None
        raise


def _entry_fingerprints(path: str):
    for fingerprint in set(read_entry(path).fingerprints):
        yield fingerprint, None


def _join(records: beam.PCollection, fingerprints: beam.PCollection, digest: str,
          keep_listed: bool) -> beam.PCollection:
    """One record of each fingerprint that is (``keep_listed``) or is not among
    ``fingerprints``: records of the same content and settings share one request's answer."""
    def choose(joined):
        _, groups = joined
        if groups["records"] and bool(groups["listed"]) == keep_listed:
            yield min(groups["records"], key=lambda element: element["key"])

    keyed = records | "KeyRecords" >> beam.Map(keyed_by_fingerprint, digest)
    return ({"records": keyed, "listed": fingerprints}
            | "Join" >> beam.CoGroupByKey()
            | "Choose" >> beam.FlatMap(choose))


def _adopt(api: BatchAPI, output_dir: str, grace: float) -> None:
    """Give every uploaded input file of the ledger its batch: the one created of it before the
    last launcher died, else a new one (never two). Uploads younger than ``grace`` seconds are
    left to the submit job that may still be running (on a cluster)."""
    for entry in read_entries(output_dir):
        if entry.batch_id is not None or time.time() - entry.uploaded_at < grace:
            continue
        try:
            batch = api.find(entry.file_id, entry.uploaded_at) or api.create(
                entry.file_id, {"beam_caption_file": entry.file_id})
        except BatchAPIError as exc:
            raise UsageError(str(exc)) from None
        _take(output_dir, entry, batch)


def _take(output_dir: str, entry: LedgerEntry, batch: BatchState) -> None:
    """Record the batch's new state; one line when its object was not of the documented shape."""
    entry.update(batch)
    write_entry(output_dir, entry)
    if batch.problems:
        ending = f": its unanswered requests fail as batch_{entry.status}" if entry.ended \
            and entry.status in FAILED_ENDS else ""
        print(f"batch: batch {entry.batch_id} answered an object not of the documented shape "
              f"({'; '.join(batch.problems)}){ending}", file=sys.stderr)


def poll(api: BatchAPI, output_dir: str, max_interval: float, grace: float = 0.0,
         max_wait: float = float("inf")) -> list[LedgerEntry]:
    """Wait for every batch of the ledger to end, writing each one's state as it changes;
    one progress line on stderr per poll. A batch the API no longer knows (404) counts as
    failed; one not ended ``max_wait`` seconds after its upload ends as ``timeout``. A batch
    given up so (or ``invalid``) is cancelled (see ``_cancel``) and what it answered is
    collected. The ended ledger."""
    delay = min(FIRST_POLL_S, max_interval)
    cancel_wait = min(CANCEL_WAIT_S, max_wait)
    while True:
        _adopt(api, output_dir, grace)
        entries = read_entries(output_dir)
        for entry in entries:
            batch_id = entry.batch_id
            if batch_id is None:
                continue
            if entry.cancel == CANCEL_ASKED:
                _follow_cancel(api, output_dir, entry, batch_id, cancel_wait)
                continue
            if not entry.ended and time.time() - entry.uploaded_at > max_wait:
                was = entry.status
                entry.give_up(f"not ended {max_wait / HOUR_S:g} h after its upload "
                              "(--batch_max_wait_hours)")
                write_entry(output_dir, entry)
                cancelled = " and cancelled" if _cancel(api, output_dir, entry, batch_id) else ""
                print(f"batch: batch {batch_id} is still {was} {max_wait / HOUR_S:g} h after "
                      f"its upload: given up (batch_timeout){cancelled}; what it answered is "
                      "collected", file=sys.stderr)
            elif not entry.ended:
                batch = _look(api, batch_id)
                if batch is not None and (batch.status != entry.status
                                          or batch.request_counts != entry.request_counts):
                    _take(output_dir, entry, batch)
            if entry.needs_cancel:  # invalid, or given up before a launcher died
                _cancel(api, output_dir, entry, batch_id)
        print(progress_line(entries), file=sys.stderr, flush=True)
        if all(entry.settled for entry in entries):
            return entries
        time.sleep(delay)
        delay = min(delay * POLL_GROWTH, max_interval)


def _look(api: BatchAPI, batch_id: str) -> BatchState | None:
    """The batch as the API shows it now; None (one line) when it cannot say, this time. A
    batch the API no longer knows (404) counts as failed."""
    try:
        return api.retrieve(batch_id)
    except BatchAPIError as exc:
        if exc.status != 404:
            print(f"batch: {exc}; asking again", file=sys.stderr)
            return None
        return BatchState(batch_id, "failed", errors=(
            f"the API no longer knows batch {batch_id}",))


def _cancel(api: BatchAPI, output_dir: str, entry: LedgerEntry, batch_id: str) -> bool:
    """Cancel a batch we gave up, so that it bills nothing more, best effort: asked once (the
    ledger says it was), with the SDK's few retries; a failure is one warning line. Whether
    the API took the cancel."""
    try:
        batch = api.cancel(batch_id)
    except BatchAPIError as exc:
        entry.cancel = CANCEL_FAILED
        entry.errors.append("its cancel failed")
        write_entry(output_dir, entry)
        print(f"batch: warning: {exc}; batch {batch_id} may still run and be billed, what it "
              "answers from now on is not collected", file=sys.stderr)
        return False
    entry.cancel_taken(batch)
    write_entry(output_dir, entry)
    return True


def _follow_cancel(api: BatchAPI, output_dir: str, entry: LedgerEntry, batch_id: str,
                   wait: float) -> None:
    """One look at a batch asked to cancel: its result files once it ended; not awaited
    longer than ``wait`` seconds after the cancel (one line)."""
    if time.time() - (entry.cancel_asked_at or 0.0) > wait:
        entry.cancel = CANCEL_ENDED
        write_entry(output_dir, entry)
        print(f"batch: batch {batch_id} has not ended {wait:g} s after its cancel: what it "
              "answers later is not collected", file=sys.stderr)
        return
    batch = _look(api, batch_id)
    if batch is not None:
        entry.after_cancel(batch)
        write_entry(output_dir, entry)


def progress_line(entries: list[LedgerEntry]) -> str:
    """``batch: 3 of 4 ended (completed 3), 812 of 1,000 requests done, 4 failed``."""
    ended: dict[str, int] = {}
    for entry in entries:
        if entry.ended:
            ended[entry.status] = ended.get(entry.status, 0) + 1
    total = sum(len(entry.custom_ids) for entry in entries)
    done = sum(entry.request_counts.get("completed", 0) for entry in entries)
    failed = sum(entry.request_counts.get("failed", 0) for entry in entries)
    states = ", ".join(f"{status} {count}" for status, count in sorted(ended.items()))
    return (f"batch: {sum(ended.values())} of {len(entries)} batches ended"
            f"{f' ({states})' if states else ''}, {done:,} of {total:,} requests done, "
            f"{failed:,} failed")


def unanswered(api: BatchAPI, entries: list[LedgerEntry],
               max_result_bytes: int) -> tuple[set[str], set[str]]:
    """(fingerprints of the records with a request no ended batch answered (error lines,
    failed, expired, invalid or given up batches), the ids of the batches that left them so).
    A request past the cap of a too large output file may be answered there: it is left."""
    answered: set[tuple[str, str]] = set()
    unread: set[tuple[str, str]] = set()
    asked: dict[tuple[str, str], str | None] = {}
    for entry in entries:
        fingerprints = dict(zip(entry.custom_ids, entry.fingerprints, strict=True))
        asked.update(dict.fromkeys(fingerprints.items(), entry.batch_id))
        if not entry.output_file_id:
            continue
        try:
            with result_file(api, entry.output_file_id, max_result_bytes) as (handle, whole):
                seen = {line.custom_id for line in result_lines(handle)
                        if line.body is not None and line.custom_id in fingerprints}
        except BatchAPIError as exc:
            print(f"batch: {exc}; its requests are submitted again", file=sys.stderr)
            continue
        answered.update((cid, fingerprints[cid]) for cid in seen)
        if not whole:
            print(f"batch: the output file of batch {entry.batch_id} is over "
                  "--batch_max_result_bytes: its requests past it are not submitted again",
                  file=sys.stderr)
            unread.update(pair for pair in fingerprints.items() if pair[0] not in seen)
    left = {pair: batch_id for pair, batch_id in asked.items()
            if pair not in answered and pair not in unread}
    return {fingerprint for _, fingerprint in left}, {str(batch) for batch in left.values()}


def _delete(pattern: str) -> None:
    found = match_files(pattern)
    if found:
        FileSystems.delete(found)
