"""Batch mode's launcher: submit, wait for the batches, resubmit failed requests, collect.

``--mode batch`` runs ``submit_and_wait`` before the job's graph: the records no batch of the
ledger holds yet are submitted (a Beam job: SubmitBatches), then the launcher polls every
batch of the ledger until it ends (backoff up to ``--batch_poll_interval``, one progress line
per poll), and with ``--retry_failed`` or ``--resume`` (earlier failures are tried again, as
online) submits once more the records the batches left unanswered.
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

from beam_caption.batch import SubmitBatches, json_lines
from beam_caption.batch_api import BatchAPI, BatchAPIError
from beam_caption.batch_ledger import (
    UNSENT_PREFIX,
    LedgerEntry,
    ledger_dir,
    read_entries,
    read_entry,
    write_entry,
)
from beam_caption.errors import JobStopped, StoppedError, UsageError
from beam_caption.manifest import ReadManifests
from beam_caption.options import CaptionOptions, is_local_runner
from beam_caption.records import RECORDS
from beam_caption.resume import SkipDone, keyed_by_fingerprint
from beam_caption.runtime import CaptionConfig
from beam_caption.sinks import match_files

FIRST_POLL_S = 2.0
POLL_GROWTH = 1.5
RETRY_FILE = "retry-fingerprints.txt"
ADOPT_GRACE_S = 900.0  # on a cluster, an upload this young may still get its batch from its job


def submit_and_wait(options: CaptionOptions, files: list[str], config: CaptionConfig,
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
    entries = poll(api, out, options.batch_poll_interval, grace)
    if (options.retry_failed or options.resume) and not collect_only:
        fingerprints = unanswered(api, entries)
        if fingerprints:
            path = f"{ledger_dir(out)}/{RETRY_FILE}"
            with fsspec.open(path, "wt", encoding="utf-8") as handle:
                handle.writelines(f"{json.dumps(fp)}\n" for fp in sorted(fingerprints))
            print(f"batch: submitting again the {len(fingerprints)} records the batches left "
                  "unanswered", file=sys.stderr)
            _run_submit(new_pipeline(options), files, budgeted(config, options, out), options,
                        resume, path)
            poll(api, out, options.batch_poll_interval, grace)


def budgeted(config: CaptionConfig, options: CaptionOptions, output_dir: str) -> CaptionConfig:
    """``config`` with each worker process's share of what --max_cost leaves once the ledger's
    batches are paid (at their largest possible cost)."""
    if not options.max_cost:
        return config
    spent = sum(entry.estimated_cost for entry in read_entries(output_dir))
    share = max(0.0, options.max_cost - spent) / (options.worker_processes or 1)
    return dataclasses.replace(config, client=dataclasses.replace(config.client, max_cost=share))


def _run_submit(pipeline: beam.Pipeline, files: list[str], config: CaptionConfig,
                options: CaptionOptions, resume: bool, only_keys: str | None) -> None:
    """The submission job: the records to submit (not yet in a batch, or those of
    ``only_keys``) through SubmitBatches."""
    out = options.output
    records = (pipeline | "ReadManifests" >> ReadManifests(files))[RECORDS]
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
        time.strftime("%Y%m%dT%H%M%S"))
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
    """The records whose fingerprint is (``keep_listed``) or is not among ``fingerprints``."""
    def choose(joined):
        _, groups = joined
        if bool(groups["listed"]) == keep_listed:
            yield from groups["records"]

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
        entry.update(batch)
        write_entry(output_dir, entry)


def poll(api: BatchAPI, output_dir: str, max_interval: float,
         grace: float = 0.0) -> list[LedgerEntry]:
    """Wait for every batch of the ledger to end, writing each one's state as it changes;
    one progress line on stderr per poll. A batch the API no longer knows (404) counts as
    failed. The ended ledger."""
    delay = min(FIRST_POLL_S, max_interval)
    while True:
        _adopt(api, output_dir, grace)
        entries = read_entries(output_dir)
        for entry in entries:
            if entry.ended or entry.batch_id is None:
                continue
            try:
                batch = api.retrieve(entry.batch_id)
            except BatchAPIError as exc:
                if exc.status != 404:
                    print(f"batch: {exc}; asking again", file=sys.stderr)
                    continue
                batch = {"id": entry.batch_id, "status": "failed", "errors": {"data": [
                    {"message": f"the API no longer knows batch {entry.batch_id}"}]}}
            if batch["status"] != entry.status or batch.get("request_counts") != \
                    entry.request_counts:
                entry.update(batch)
                write_entry(output_dir, entry)
        print(progress_line(entries), file=sys.stderr, flush=True)
        if all(entry.ended for entry in entries):
            return entries
        time.sleep(delay)
        delay = min(delay * POLL_GROWTH, max_interval)


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


def unanswered(api: BatchAPI, entries: list[LedgerEntry]) -> set[str]:
    """Fingerprints of the records with a request no ended batch answered (error lines, failed
    or expired batches)."""
    answered: set[str] = set()
    asked: dict[str, str] = {}
    for entry in entries:
        asked.update(zip(entry.custom_ids, entry.fingerprints, strict=True))
        if entry.output_file_id:
            for line in json_lines(api.download(entry.output_file_id)):
                if (line.get("response") or {}).get("status_code") == 200:
                    answered.add(str(line.get("custom_id")))
    return {fingerprint for cid, fingerprint in asked.items() if cid not in answered}


def _delete(pattern: str) -> None:
    found = match_files(pattern)
    if found:
        FileSystems.delete(found)
