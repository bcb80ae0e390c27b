"""Batch mode's launcher: submit, wait for the batches, resubmit failed requests, collect.

``--mode batch`` runs ``submit_and_wait`` before the job's graph: the records no batch of the
ledger holds yet are submitted (a Beam job: SubmitBatches), then the launcher polls every
batch of the ledger until it ends (backoff up to ``--batch_poll_interval``, one progress line
per poll), and with ``--retry_failed`` submits once more the records a batch left unanswered.
The job's graph then collects (CollectBatchResults). ``collect`` (``python -m beam_caption
collect``) does the waiting and collecting only, submitting nothing.

Polling holds no worker: it runs in the launcher (or a later ``collect``), which may die and
be started again at any time; the ledger in ``OUTDIR/batches/`` says what was submitted.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import apache_beam as beam
import fsspec
from apache_beam.io.filesystems import FileSystems

from beam_caption.batch import SubmitBatches
from beam_caption.batch_api import BatchAPI, BatchAPIError
from beam_caption.batch_ledger import (
    UNSENT_PREFIX,
    LedgerEntry,
    ledger_dir,
    read_entries,
    split_custom_id,
    write_entry,
)
from beam_caption.errors import JobStopped, StoppedError, UsageError
from beam_caption.manifest import ReadManifests
from beam_caption.options import CaptionOptions
from beam_caption.records import RECORDS
from beam_caption.resume import SkipDone
from beam_caption.runtime import CaptionConfig
from beam_caption.sinks import match_files

FIRST_POLL_S = 2.0
POLL_GROWTH = 1.5
RETRY_KEYS_FILE = "retry-keys.txt"


def submit_and_wait(options: CaptionOptions, files: list[str], config: CaptionConfig,
                    api_key: str | None, resume: bool,
                    new_pipeline: Callable[[CaptionOptions], beam.Pipeline],
                    collect_only: bool = False) -> list[LedgerEntry]:
    """Submit what no batch holds yet (not when ``collect_only``), wait for every batch of the
    ledger to end, resubmit what they left unanswered once (``--retry_failed``); the ended
    ledger."""
    out = options.output
    api = BatchAPI(config.client.api_url, api_key)
    _adopt(api, out)
    several = len(config.prompt_specs) > 1
    if not collect_only:
        _delete(f"{ledger_dir(out)}/{UNSENT_PREFIX}-*")  # those records are tried again
        _run_submit(new_pipeline(options), files, config, options, resume, None)
    entries = poll(api, out, options.batch_poll_interval)
    if options.retry_failed and not collect_only:
        keys = unanswered_keys(api, entries, several)
        if keys:
            path = f"{ledger_dir(out)}/{RETRY_KEYS_FILE}"
            with fsspec.open(path, "wt", encoding="utf-8") as handle:
                handle.writelines(f"{json.dumps(key)}\n" for key in sorted(keys))
            print(f"batch: submitting again the {len(keys)} records the batches left "
                  "unanswered (--retry_failed)", file=sys.stderr)
            _run_submit(new_pipeline(options), files, config, options, resume, path)
            entries = poll(api, out, options.batch_poll_interval)
    return entries


def _run_submit(pipeline: beam.Pipeline, files: list[str], config: CaptionConfig,
                options: CaptionOptions, resume: bool, only_keys: str | None) -> None:
    """The submission job: the records to submit (not yet in a batch, or those of
    ``only_keys``) through SubmitBatches."""
    out = options.output
    records = (pipeline | "ReadManifests" >> ReadManifests(files))[RECORDS]
    if resume:
        records = (records | "SkipDone" >> SkipDone(out, config.settings_digest))["todo"]
    if only_keys:
        keys = (pipeline | "ReadKeys" >> beam.io.ReadFromText(only_keys)
                | "ParseKeys" >> beam.Map(lambda line: (json.loads(line), None)))
        chosen = _join_keys(records, keys, keep_listed=True)
    else:
        several = len(config.prompt_specs) > 1
        entries = match_files(f"{ledger_dir(out)}/*.json")
        covered = (pipeline | "Ledger" >> beam.Create(entries)
                   | "CoveredKeys" >> beam.FlatMap(_entry_keys, several))
        chosen = _join_keys(records, covered, keep_listed=False)
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


def _entry_keys(path: str, several: bool):
    with fsspec.open(path, "rt", encoding="utf-8") as handle:
        cids = json.load(handle)["custom_ids"]
    for key in dict.fromkeys(split_custom_id(cid, several)[0] for cid in cids):
        yield key, None


def _join_keys(records: beam.PCollection, keys: beam.PCollection,
               keep_listed: bool) -> beam.PCollection:
    """The records whose key is (``keep_listed``) or is not among ``keys``."""
    def choose(joined):
        _, groups = joined
        if bool(groups["keys"]) == keep_listed:
            yield from groups["records"]

    return ({"records": records | "KeyRecords" >> beam.Map(lambda e: (e["key"], e)),
             "keys": keys}
            | "JoinKeys" >> beam.CoGroupByKey()
            | "Choose" >> beam.FlatMap(choose))


def _adopt(api: BatchAPI, output_dir: str) -> None:
    """Give every uploaded input file of the ledger its batch: the one created of it before the
    last launcher died, else a new one (never two)."""
    for entry in read_entries(output_dir):
        if entry.batch_id is not None:
            continue
        try:
            batch = api.find(entry.file_id, entry.uploaded_at) or api.create(
                entry.file_id, {"beam_caption_file": entry.file_id})
        except BatchAPIError as exc:
            raise UsageError(str(exc)) from None
        entry.update(batch)
        write_entry(output_dir, entry)


def poll(api: BatchAPI, output_dir: str, max_interval: float) -> list[LedgerEntry]:
    """Wait for every batch of the ledger to end, writing each one's state as it changes;
    one progress line on stderr per poll. The ended ledger."""
    delay = min(FIRST_POLL_S, max_interval)
    while True:
        entries = read_entries(output_dir)
        for entry in entries:
            if entry.ended or entry.batch_id is None:
                continue
            try:
                batch = api.retrieve(entry.batch_id)
            except BatchAPIError as exc:
                print(f"batch: {exc}; asking again", file=sys.stderr)
                continue
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


def unanswered_keys(api: BatchAPI, entries: list[LedgerEntry], several: bool) -> set[str]:
    """Keys of the records with a request no ended batch answered (error lines, failed or
    expired batches)."""
    answered: set[str] = set()
    asked: set[str] = set()
    for entry in entries:
        asked.update(entry.custom_ids)
        if entry.output_file_id:
            for raw in api.download(entry.output_file_id).splitlines():
                line = json.loads(raw)
                if (line.get("response") or {}).get("status_code") == 200:
                    answered.add(line["custom_id"])
    return {split_custom_id(cid, several)[0] for cid in asked - answered}


def _delete(pattern: str) -> None:
    found = match_files(pattern)
    if found:
        FileSystems.delete(found)
