"""Batch mode's two graphs: submit the records' requests as batches, then collect the answers.

``SubmitBatches``: keyed records -> images read and prepared as online (each record's
requests, one per prompt) -> input files of at most ``max_requests`` lines and ``max_bytes``
(or what one bundle holds) -> uploaded and made batches, each recorded in the ledger
(batch_ledger.py) as it is created. Records that cannot be prepared are written to the
ledger's ``unsent-*`` files as failures. Runs on the workers, in parallel.

``CollectBatchResults``: keyed records joined with the ended batches' output and error lines
(and the unsent failures) by key -> captions and failures shaped exactly as online, one per
record; with ``fallback`` the records a batch could not answer go through the online path
(CaptionImages) instead. It is the caption step CaptionManifests runs in batch mode.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import shared

from beam_caption.batch_api import CHAT_ENDPOINT, BatchAPI, BatchAPIError
from beam_caption.batch_ledger import (
    FAILED_ENDS,
    UNSENT_PREFIX,
    LedgerEntry,
    custom_id,
    entry_exists,
    entry_name,
    ledger_dir,
    read_entry,
    split_custom_id,
    write_entry,
)
from beam_caption.caption import CaptionImages
from beam_caption.client import (
    Completion,
    HTTPStatusFailure,
    classify_exception,
    parse_completion,
    scrub_answer,
)
from beam_caption.errors import CaptionError, JobStopped
from beam_caption.records import (
    CAPTIONS,
    FAILURES,
    STATS,
    answers_meta,
    captioned_record,
    failure_element,
)
from beam_caption.redact import scrub
from beam_caption.resume import keyed_by_fingerprint, record_fingerprint
from beam_caption.runtime import CaptionConfig, CaptionRuntime, Prepared, usable_cores
from beam_caption.sinks import WriteRecords, match_files
from beam_caption.structured import answer_checker

FALLBACK = "fallback"
_LINE_HEAD = b'{"custom_id":'
_LINE_MIDDLE = f',"method":"POST","url":"{CHAT_ENDPOINT}","body":'.encode()


def request_line(cid: str, body: bytes) -> bytes:
    """One line of a batch input file (the body is not parsed again)."""
    return _LINE_HEAD + json.dumps(cid).encode() + _LINE_MIDDLE + body + b"}\n"


class _PrepareRequests(beam.DoFn):
    """Keyed records -> each record's [(custom_id, fingerprint, input file line, estimated
    cost)], one per prompt; failures tagged."""

    def __init__(self, config: CaptionConfig, shared_handle: shared.Shared):
        self._config = config
        self._shared = shared_handle

    def setup(self):
        config = self._config
        self._runtime = self._shared.acquire(lambda: CaptionRuntime(config), tag=repr(config))
        self._window = 2 * config.client.max_concurrency + usable_cores()
        client = config.client
        self._prices = (client.price_per_million_input_tokens / 1e6 * client.batch_discount,
                        client.price_per_million_output_tokens / 1e6 * client.batch_discount)
        self._several = len(config.prompt_specs) > 1

    def start_bundle(self):
        self._pending: collections.deque[tuple[dict, concurrent.futures.Future]] = \
            collections.deque()

    def process(self, element):
        self._pending.append((element, self._runtime.submit_prepare(element)))
        while len(self._pending) >= self._window or (self._pending and self._pending[0][1].done()):
            yield from self._emit(*self._pending.popleft())

    def finish_bundle(self):
        while self._pending:
            for output in self._emit(*self._pending.popleft()):
                if isinstance(output, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(
                        output.value))
                else:
                    yield GlobalWindows.windowed_value(output)

    def _emit(self, element: dict, future: concurrent.futures.Future):
        prepared: Prepared = future.result()
        if prepared.failure is not None:
            yield beam.pvalue.TaggedOutput(FAILURES, prepared.failure)
            return
        fingerprint = record_fingerprint(element["record"], self._config.settings_digest)
        requests = []
        for name, body, input_tokens, output_tokens in prepared.requests:
            cid = custom_id(element["key"], name if self._several else None)
            cost = input_tokens * self._prices[0] + output_tokens * self._prices[1]
            requests.append((cid, fingerprint, request_line(cid, body), cost))
        yield requests  # a record's requests stay in one input file


class _BatchSubmitter:
    """One per worker process: the Batch API client and the process's share of --max_cost."""

    def __init__(self, config: CaptionConfig, output_dir: str):
        self.api = BatchAPI(config.client.api_url, config.api_key.resolve())
        self.output_dir = output_dir
        self.budget = config.client.max_cost
        self.spent = 0.0
        self.lock = threading.Lock()

    def submit(self, data: io.BytesIO, cids: list[str], fingerprints: list[str],
               cost: float) -> LedgerEntry | None:
        """Upload one input file, record it, make it a batch, record that; None when the
        ledger has it already (a bundle the runner runs again)."""
        name = entry_name(cids, fingerprints)
        if entry_exists(self.output_dir, name):
            return None
        with self.lock:
            if self.budget is not None and self.spent + cost > self.budget:
                raise JobStopped(
                    f"--max_cost would be spent by the next batch (this worker process's "
                    f"share: ${self.budget:.4f}, submitted ${self.spent:.4f}, the batch "
                    f"${cost:.4f} at most). Records not submitted are left for --resume with "
                    "a higher --max_cost.")
            self.spent += cost
        try:
            data.seek(0)
            file_id = self.api.upload(data, f"beam_caption-{uuid.uuid4().hex}.jsonl")
            entry = LedgerEntry(name, file_id, cids, fingerprints, time.time(), round(cost, 6))
            write_entry(self.output_dir, entry)
            entry.update(self.api.create(file_id, {"beam_caption_file": file_id}))
            write_entry(self.output_dir, entry)
        except BatchAPIError as exc:
            raise JobStopped(f"{exc}. Batches already submitted are in the output directory; "
                             "--resume submits the rest and collects them all.") from None
        return entry


class _SubmitFiles(beam.DoFn):
    """Records' [(custom_id, fingerprint, line, cost)] -> ledger entries: lines gathered into
    input files
    within the limits (or what one bundle holds), a record's lines in one file, each file
    uploaded and made a batch."""

    def __init__(self, config: CaptionConfig, output_dir: str, max_requests: int,
                 max_bytes: int, shared_handle: shared.Shared):
        self._config = config
        self._output_dir = output_dir
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._shared = shared_handle

    def setup(self):
        config, output_dir = self._config, self._output_dir
        self._submitter = self._shared.acquire(lambda: _BatchSubmitter(config, output_dir),
                                               tag=f"submit:{output_dir}:{config!r}")

    def start_bundle(self):
        self._file = io.BytesIO()  # the input file being filled: one copy of its lines
        self._cids: list[str] = []
        self._fingerprints: list[str] = []
        self._bytes = 0
        self._cost = 0.0

    def process(self, requests):
        size = sum(len(line) for _, _, line, _ in requests)
        if self._cids and (len(self._cids) + len(requests) > self._max_requests
                           or self._bytes + size > self._max_bytes):
            yield from self._flush()
        for cid, fingerprint, line, cost in requests:
            self._file.write(line)
            self._cids.append(cid)
            self._fingerprints.append(fingerprint)
            self._cost += cost
        self._bytes += size

    def finish_bundle(self):
        for entry in self._flush():
            yield GlobalWindows.windowed_value(entry)

    def _flush(self):
        if not self._cids:
            return
        entry = self._submitter.submit(self._file, self._cids, self._fingerprints, self._cost)
        self.start_bundle()
        if entry is not None:
            yield {"file_id": entry.file_id, "batch_id": entry.batch_id,
                   "requests": len(entry.custom_ids)}


class SubmitBatches(beam.PTransform):
    """Submit keyed records' requests as Batch API batches (see the module).

    Returns the ledger entries made (``{"file_id", "batch_id", "requests"}``).
    """

    def __init__(self, config: CaptionConfig, output_dir: str, max_requests: int,
                 max_bytes: int, run_stamp: str):
        super().__init__()
        self._config = config
        self._output_dir = output_dir
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._run_stamp = run_stamp

    def expand(self, records: beam.PCollection[dict]) -> beam.PCollection[dict]:
        runtime = shared.Shared()
        prepared = records | "Prepare" >> beam.ParDo(
            _PrepareRequests(self._config, runtime)).with_outputs(FAILURES, main="requests")
        prepared[FAILURES] | "WriteUnsent" >> WriteRecords(
            ledger_dir(self._output_dir), f"{UNSENT_PREFIX}-{self._run_stamp}",
            skip_if_empty=True)
        return prepared["requests"] | "Submit" >> beam.ParDo(_SubmitFiles(
            self._config, self._output_dir, self._max_requests, self._max_bytes,
            shared.Shared()))


def _batch_error(entry: LedgerEntry) -> CaptionError:
    """Why a batch that ended without answering a request did not answer it."""
    why = "; ".join(entry.errors) or f"the batch {entry.status}"
    return CaptionError("request", f"batch_{entry.status}",
                        f"batch {entry.batch_id} {entry.status}: {why}", retryable=True,
                        attempts=1)


def _line_error(line: dict, secrets: tuple[str, ...]) -> CaptionError:
    """The error of one error-file line: a non-200 answer, or the batch's own error."""
    response = line.get("response") or {}
    if isinstance(response.get("status_code"), int):  # typed as the online path types it
        typed = classify_exception(HTTPStatusFailure(
            response["status_code"], None, json.dumps(response.get("body")).encode()))
        return CaptionError(typed.stage, typed.type, scrub(typed.message, secrets),
                            typed.retryable, 1)
    error = line.get("error") or {}
    code = str(error.get("code") or "batch_error")
    return CaptionError("request", code, scrub(str(error.get("message") or code)[:500], secrets),
                        retryable=True, attempts=1)


class _DownloadResults(beam.DoFn):
    """A ledger entry's path -> (fingerprint, result) for each of its requests: its output and
    error lines, and for a request in neither, the batch's end (or the download's failure). A
    result is (prompt name or None, answer body or None, CaptionError or None, batch id, ended
    at, latency ms)."""

    def __init__(self, config: CaptionConfig):
        self._config = config

    def setup(self):
        api_key = self._config.api_key.resolve()
        self._api = BatchAPI(self._config.client.api_url, api_key)
        self._secrets = (api_key,) if api_key else ()
        self._several = len(self._config.prompt_specs) > 1

    def process(self, path: str):
        entry = read_entry(path)
        fingerprints = dict(zip(entry.custom_ids, entry.fingerprints, strict=True))
        ended = entry.ended_at or entry.uploaded_at
        latency = round(max(0.0, ended - entry.uploaded_at) * 1000, 1)
        seen: set[str] = set()
        missing: CaptionError | None = None
        for file_id in (entry.output_file_id, entry.error_file_id):
            try:
                lines = self._lines(file_id)
            except BatchAPIError as exc:
                missing = CaptionError("request", "batch_download_failed", scrub(
                    str(exc), self._secrets), retryable=True, attempts=1)
                continue
            for line in lines:
                cid = line.get("custom_id")
                if cid not in fingerprints or cid in seen:
                    continue
                seen.add(cid)
                prompt = split_custom_id(cid, self._several)[1]
                response = line.get("response") or {}
                result: tuple
                if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
                    result = (prompt, response["body"], None)
                else:
                    result = (prompt, None, _line_error(line, self._secrets))
                yield fingerprints[cid], (*result, entry.batch_id, ended, latency)
        if missing is None and (entry.status in FAILED_ENDS or len(seen) < len(fingerprints)):
            missing = _batch_error(entry) if entry.status in FAILED_ENDS else CaptionError(
                "request", "batch_missing_result",
                f"batch {entry.batch_id} {entry.status} without a result for this request",
                retryable=True, attempts=1)
        for cid, fingerprint in fingerprints.items():
            if cid not in seen:
                prompt = split_custom_id(cid, self._several)[1]
                yield fingerprint, (prompt, None, missing, entry.batch_id, ended, latency)

    def _lines(self, file_id: str | None) -> Iterator[dict]:
        """The JSON lines of a result file, downloaded first (a failure raises here, before any
        line is used), then parsed one by one."""
        data = self._api.download(file_id) if file_id else b""
        return json_lines(data)


def json_lines(data: bytes) -> Iterator[dict]:
    """The JSON objects of a result file's lines; torn lines are skipped."""
    for raw in io.BytesIO(data):
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # a torn line: its request counts as without a result
        if isinstance(line, dict):
            yield line


class _Assemble(beam.DoFn):
    """(fingerprint, {"record": [elements], "results": [...], "unsent": [failures]}) -> each
    record's caption, or its failure, or (``fallback``) the record for the online path."""

    def __init__(self, config: CaptionConfig, fallback: bool):
        self._config = config
        self._fallback = fallback

    def setup(self):
        config = self._config
        self._specs = config.prompt_specs
        self._checks = {spec.name: answer_checker(spec.wants_json, spec.schema)
                        for spec in self._specs}
        api_key = config.api_key.resolve()
        self._secrets = (api_key,) if api_key else ()

    def process(self, joined):
        _, groups = joined
        # Records of the same content and settings share their answers; results without a
        # record are of one not in this run (resumed, edited, or no longer in a manifest).
        unsent = {failure["key"]: failure for failure in groups["unsent"]}
        for element in groups["record"]:
            if element["key"] in unsent:
                yield beam.pvalue.TaggedOutput(FAILURES, unsent[element["key"]])
            else:
                yield self._outcome(element, groups["results"])

    def _outcome(self, element: dict, results: list):
        """The record's caption, its failure, or (fallback) the record for the online path."""
        several = len(self._specs) > 1
        answers, errors = {}, {}
        for spec in self._specs:
            mine = [r for r in results if r[0] == (spec.name if several else None)]
            answer, error = self._pick(spec, mine)
            if answer is not None:
                answers[spec.name] = answer
            else:
                errors[spec.name] = error or CaptionError(
                    "request", "not_submitted", "no batch holds this request: run the job "
                    "with --resume to submit it", retryable=True)
        if not errors:
            return self._caption(element, answers)
        if self._fallback:
            return beam.pvalue.TaggedOutput(FALLBACK, element)
        name, error = next(iter(errors.items()))
        done = {spec.output_key: answers[spec.name][0] for spec in self._specs
                if spec.name in answers}
        return beam.pvalue.TaggedOutput(FAILURES, failure_element(
            element["key"], element["source"], error, record=element["record"],
            prompt=name if several else None, answers=done))

    def _pick(self, spec, results):
        """The first result that is a usable answer ((value, parsed, result)), else the last
        error."""
        error = None
        for result in sorted(results, key=lambda r: r[4] or 0):
            _, body, result_error, *_ = result
            if result_error is not None:
                error = result_error
                continue
            try:
                parsed = parse_completion(json.dumps(body).encode(),
                                          self._config.client.max_caption_chars)
                check = self._checks[spec.name]
                value = parsed.caption if check is None else check(parsed.caption)
            except CaptionError as exc:
                error = CaptionError(exc.stage, exc.type, exc.message, exc.retryable, 1)
                continue
            return (scrub_answer(value, self._secrets), parsed, result), None
        return None, error

    def _caption(self, element: dict, answers: dict) -> dict:
        """The captioned record of its answers (prompt name -> (value, parsed, result))."""
        completions = {name: Completion(
            value, parsed.finish_reason, parsed.prompt_tokens, parsed.completion_tokens,
            attempts=1, latency_ms=result[5], reasoning_tokens=parsed.reasoning_tokens)
            for name, (value, parsed, result) in answers.items()}
        results = [result for _, _, result in answers.values()]
        meta = answers_meta(
            self._config.client.model, element["key"],
            record_fingerprint(element["record"], self._config.settings_digest), completions,
            max(result[4] or 0 for result in results), batch_id=results[0][3])
        return captioned_record(element["record"], {
            spec.output_key: answers[spec.name][0] for spec in self._specs}, meta)


class CollectBatchResults(beam.PTransform):
    """The caption step of batch mode: keyed records in, ``{CAPTIONS, FAILURES, STATS}`` out
    (as CaptionImages), from the ended batches of the ledger (see the module)."""

    def __init__(self, config: CaptionConfig, output_dir: str, fallback: bool = False):
        super().__init__()
        self._config = config
        self._output_dir = output_dir
        self._fallback = fallback

    def expand(self, records: beam.PCollection[dict]) -> dict[str, beam.PCollection[dict]]:
        pipeline, digest = records.pipeline, self._config.settings_digest
        ledger = ledger_dir(self._output_dir)
        results = (pipeline
                   | "Ledger" >> beam.Create(match_files(f"{ledger}/*.json"))
                   | "Reshuffle" >> beam.Reshuffle()
                   | "Download" >> beam.ParDo(_DownloadResults(self._config)))
        if match_files(f"{ledger}/{UNSENT_PREFIX}-*"):
            unsent = (pipeline
                      | "ReadUnsent" >> beam.io.ReadFromText(f"{ledger}/{UNSENT_PREFIX}-*")
                      | "ParseUnsent" >> beam.Map(json.loads)
                      | "KeyUnsent" >> beam.Map(keyed_by_fingerprint, digest))
        else:
            unsent = pipeline | "NoUnsent" >> beam.Create([])
        keyed = records | "KeyRecords" >> beam.Map(keyed_by_fingerprint, digest)
        joined = ({"record": keyed, "results": results, "unsent": unsent}
                  | "Join" >> beam.CoGroupByKey()
                  | "Assemble" >> beam.ParDo(_Assemble(self._config, self._fallback))
                  .with_outputs(FAILURES, FALLBACK, main=CAPTIONS))
        if not self._fallback:
            stats = pipeline | "NoStats" >> beam.Create([])
            return {CAPTIONS: joined[CAPTIONS], FAILURES: joined[FAILURES], STATS: stats}
        online = joined[FALLBACK] | "Online" >> CaptionImages(self._config)
        return {CAPTIONS: (joined[CAPTIONS], online[CAPTIONS]) | "AllCaptions" >> beam.Flatten(),
                FAILURES: (joined[FAILURES], online[FAILURES]) | "AllFailures" >> beam.Flatten(),
                STATS: online[STATS]}

