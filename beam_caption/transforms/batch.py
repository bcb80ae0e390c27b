"""Batch mode's two graphs: submit the records' requests as batches, then collect the answers.

``SubmitBatches``: keyed records (one per fingerprint, see cli/batch_launch.py) -> images read and
prepared as online (each record's requests, one per prompt) -> input files of at most
``max_requests`` lines and ``max_bytes`` (or what one bundle holds) -> uploaded and made
batches, each recorded in the ledger (core/ledger.py) as it is created. Records that cannot be
prepared are written to the ledger's ``unsent-*`` files as failures. Runs on the workers, in
parallel.

``CollectBatchResults``: keyed records joined with the ended batches' output and error lines
(and the unsent failures) by fingerprint -> captions and failures shaped exactly as online,
one per record (records of one fingerprint share its request's answer); with ``fallback`` the
records a batch could not answer go through the online path (CaptionImages) instead. It is the
caption step CaptionManifests runs in batch mode. Result files are streamed to a temporary
file of at most ``max_result_bytes`` and read line by line; ``result_line`` is the one check of
a line's shape: a line of another shape costs its one request (a typed failure).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import json
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import shared

from beam_caption.core.batch_api import CHAT_ENDPOINT, BatchAPI, BatchAPIError, short_repr
from beam_caption.core.client import (
    Completion,
    HTTPStatusFailure,
    classify_exception,
    judge_completion,
    read_completion,
    scrub_answer,
)
from beam_caption.core.engine import CaptionRuntime, Prepared, WorkerConfig, usable_cores
from beam_caption.core.errors import CaptionError, JobStopped
from beam_caption.core.identity import element_fingerprint, keyed_by_fingerprint
from beam_caption.core.ledger import (
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
from beam_caption.core.records import CAPTIONS, FAILURES, STATS, record_outcome
from beam_caption.core.redact import scrub
from beam_caption.core.structured import answer_checker
from beam_caption.transforms.caption import CaptionImages
from beam_caption.transforms.write import WriteRecords, match_files

FALLBACK = "fallback"
MAX_RESULT_BYTES = 2_000_000_000  # default --batch_max_result_bytes
MAX_RESULT_LINE_BYTES = 16 << 20  # a longer result line is skipped (its request has no result)
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_LINE_HEAD = b'{"custom_id":'
_LINE_MIDDLE = f',"method":"POST","url":"{CHAT_ENDPOINT}","body":'.encode()


def request_line(cid: str, body: bytes) -> bytes:
    """One line of a batch input file (the body is not parsed again)."""
    return _LINE_HEAD + json.dumps(cid).encode() + _LINE_MIDDLE + body + b"}\n"


class _PrepareRequests(beam.DoFn):
    """Keyed records -> each record's [(custom_id, fingerprint, input file line, estimated
    cost)], one per prompt; failures tagged."""

    def __init__(self, config: WorkerConfig, shared_handle: shared.Shared):
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
        fingerprint = element_fingerprint(element, self._config.settings_digest)
        requests = []
        for name, body, input_tokens, output_tokens in prepared.requests:
            cid = custom_id(element["key"], name if self._several else None)
            cost = input_tokens * self._prices[0] + output_tokens * self._prices[1]
            requests.append((cid, fingerprint, request_line(cid, body), cost))
        yield requests  # a record's requests stay in one input file


class _BatchSubmitter:
    """One per worker process: the Batch API client and the process's share of --max_cost."""

    def __init__(self, config: WorkerConfig, output_dir: str, retry_of: str):
        self.api = BatchAPI(config.client.api_url, config.api_key.resolve())
        self.output_dir = output_dir
        self.retry_of = retry_of
        self.budget = config.client.max_cost
        self.spent = 0.0
        self.lock = threading.Lock()

    def submit(self, data: io.BytesIO, cids: list[str], fingerprints: list[str],
               cost: float) -> LedgerEntry | None:
        """Upload one input file, record it, make it a batch, record that; None when the
        ledger has it already (a bundle the runner runs again)."""
        name = entry_name(cids, fingerprints, self.retry_of)
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
            created = self.api.create(file_id, {"beam_caption_file": file_id})
            if created.problems:  # judged (one line) by the launcher when it polls
                entry.batch_id = created.id
            else:
                entry.update(created)
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

    def __init__(self, config: WorkerConfig, output_dir: str, max_requests: int,
                 max_bytes: int, retry_of: str, shared_handle: shared.Shared):
        self._config = config
        self._output_dir = output_dir
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._retry_of = retry_of
        self._shared = shared_handle

    def setup(self):
        config, output_dir, retry_of = self._config, self._output_dir, self._retry_of
        self._submitter = self._shared.acquire(
            lambda: _BatchSubmitter(config, output_dir, retry_of),
            tag=f"submit:{output_dir}:{retry_of}:{config!r}")

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

    Returns the ledger entries made (``{"file_id", "batch_id", "requests"}``). A retry pass
    gives ``retry_of`` (the batches it retries, see batch_ledger.entry_name).
    """

    def __init__(self, config: WorkerConfig, output_dir: str, max_requests: int,
                 max_bytes: int, run_stamp: str, retry_of: str = ""):
        super().__init__()
        self._config = config
        self._output_dir = output_dir
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._run_stamp = run_stamp
        self._retry_of = retry_of

    def expand(self, records: beam.PCollection[dict]) -> beam.PCollection[dict]:
        runtime = shared.Shared()
        prepared = records | "Prepare" >> beam.ParDo(
            _PrepareRequests(self._config, runtime)).with_outputs(FAILURES, main="requests")
        prepared[FAILURES] | "WriteUnsent" >> WriteRecords(
            ledger_dir(self._output_dir), f"{UNSENT_PREFIX}-{self._run_stamp}",
            skip_if_empty=True)
        return prepared["requests"] | "Submit" >> beam.ParDo(_SubmitFiles(
            self._config, self._output_dir, self._max_requests, self._max_bytes,
            self._retry_of, shared.Shared()))


def _batch_error(entry: LedgerEntry) -> CaptionError:
    """Why a batch that ended without answering a request did not answer it."""
    why = "; ".join(entry.errors) or f"the batch {entry.status}"
    return CaptionError("request", f"batch_{entry.status}",
                        f"batch {entry.batch_id} {entry.status}: {why}", retryable=True,
                        attempts=1)


@dataclass(frozen=True)
class ResultLine:
    """One line of a result file: the request's answer body (HTTP 200), or why it has none."""

    custom_id: str
    body: dict | None
    error: CaptionError | None


def result_line(line: object, secrets: tuple[str, ...] = ()) -> ResultLine | None:
    """The one check of a result line's shape: None without a custom_id (the line answers no
    request we can name); a line of any undocumented shape is its request's typed failure."""
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    cid, response, error = line["custom_id"], line.get("response"), line.get("error")
    status = response.get("status_code") if isinstance(response, dict) else None
    if isinstance(response, dict) and isinstance(status, int) and not isinstance(status, bool) \
            and 100 <= status <= 599:
        body = response.get("body")
        if status == 200 and isinstance(body, dict):
            return ResultLine(cid, body, None)
        if status != 200:  # typed as the online path types it
            typed = classify_exception(HTTPStatusFailure(status, None, json.dumps(body).encode()))
            return ResultLine(cid, None, CaptionError(
                typed.stage, typed.type, scrub(typed.message, secrets), typed.retryable, 1))
    elif response is None and isinstance(error, dict):  # the batch's own error for the request
        code, message = error.get("code"), error.get("message")
        code = code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else "batch_error"
        message = message[:500] if isinstance(message, str) and message else code
        return ResultLine(cid, None, CaptionError("request", code, scrub(message, secrets),
                                                  retryable=True, attempts=1))
    return ResultLine(cid, None, CaptionError(
        "response", "batch_malformed_result",
        scrub(f"the result line of {cid[:100]!r} has response {short_repr(response)} and error "
              f"{short_repr(error)}, not the documented shape", secrets),
        retryable=True, attempts=1))


@contextlib.contextmanager
def result_file(api: BatchAPI, file_id: str, max_bytes: int) -> Iterator[tuple[IO[bytes], bool]]:
    """A result file streamed to a temporary file (at most ``max_bytes``; BatchAPIError if it
    cannot be downloaded): (the file, from its start; whether it came whole)."""
    with tempfile.TemporaryFile() as handle:
        whole = api.download_to(file_id, handle, max_bytes)
        handle.seek(0)
        yield handle, whole


def json_lines(data: bytes | IO[bytes]) -> Iterator[dict]:
    """The JSON objects of a result file's lines; torn lines, lines that are not objects and
    lines over MAX_RESULT_LINE_BYTES are skipped."""
    handle = io.BytesIO(data) if isinstance(data, bytes) else data
    while raw := handle.readline(MAX_RESULT_LINE_BYTES + 1):
        if len(raw) > MAX_RESULT_LINE_BYTES:
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                raw = handle.readline(MAX_RESULT_LINE_BYTES)
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # a torn line: its request counts as without a result
        if isinstance(line, dict):
            yield line


def result_lines(handle: IO[bytes], secrets: tuple[str, ...] = ()) -> Iterator[ResultLine]:
    """The result lines of a result file that name a request (see result_line)."""
    for line in json_lines(handle):
        checked = result_line(line, secrets)
        if checked is not None:
            yield checked


def too_large(file_id: str, batch_id: str | None, max_bytes: int) -> CaptionError:
    """Why a request past the cap of a too large result file has no result."""
    return CaptionError(
        "response", "batch_result_too_large",
        f"the result file {file_id} of batch {batch_id} is over --batch_max_result_bytes "
        f"({max_bytes:,} bytes): lines past that were not read. Raise it and run collect.",
        retryable=False, attempts=1)


class _DownloadResults(beam.DoFn):
    """A ledger entry's path -> (fingerprint, result) for each of its requests: its output and
    error lines, and for a request in neither, the batch's end (or the download's failure). A
    result is (prompt name or None, answer body or None, CaptionError or None, batch id, ended
    at, latency ms)."""

    def __init__(self, config: WorkerConfig, max_result_bytes: int):
        self._config = config
        self._max_result_bytes = max_result_bytes

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
        missing: CaptionError | None = None  # why a request has no result, if not the end's
        for file_id in (entry.output_file_id, entry.error_file_id):
            if not file_id:
                continue
            try:
                with result_file(self._api, file_id, self._max_result_bytes) as (handle, whole):
                    for line in result_lines(handle, self._secrets):
                        if line.custom_id not in fingerprints or line.custom_id in seen:
                            continue
                        seen.add(line.custom_id)
                        prompt = split_custom_id(line.custom_id, self._several)[1]
                        yield fingerprints[line.custom_id], (
                            prompt, line.body, line.error, entry.batch_id, ended, latency)
            except BatchAPIError as exc:
                missing = CaptionError("request", "batch_download_failed", scrub(
                    str(exc), self._secrets), retryable=True, attempts=1)
                continue
            if not whole:
                missing = too_large(file_id, entry.batch_id, self._max_result_bytes)
        if missing is None and (entry.status in FAILED_ENDS or len(seen) < len(fingerprints)):
            missing = _batch_error(entry) if entry.status in FAILED_ENDS else CaptionError(
                "request", "batch_missing_result",
                f"batch {entry.batch_id} {entry.status} without a result for this request",
                retryable=True, attempts=1)
        for cid, fingerprint in fingerprints.items():
            if cid not in seen:
                prompt = split_custom_id(cid, self._several)[1]
                yield fingerprint, (prompt, None, missing, entry.batch_id, ended, latency)


class _Assemble(beam.DoFn):
    """(fingerprint, {"record": [elements], "results": [...], "unsent": [failures]}) -> each
    record's caption, or its failure, or (``fallback``) the record for the online path."""

    def __init__(self, config: WorkerConfig, fallback: bool):
        self._config = config
        self._fallback = fallback

    def setup(self):
        config = self._config
        self._specs = config.prompt_specs
        self._checks = {spec.name: answer_checker(spec.wants_json, spec.schema,
                                                  config.answer_checks.checker())
                        for spec in self._specs}
        api_key = config.api_key.resolve()
        self._secrets = (api_key,) if api_key else ()

    def process(self, joined):
        _, groups = joined
        # Records of the same content and settings share their answers (one of them was
        # submitted), and the failure to prepare that one; results without a record are of one
        # not in this run (resumed, edited, or no longer in a manifest).
        unsent = {failure["key"]: failure for failure in groups["unsent"]}
        results = groups["results"]
        shared_failure = next(iter(unsent.values()), None)
        paid_by = None  # the first record given the answers: the others get them as cached
        for element in groups["record"]:
            if element["key"] in unsent:
                yield beam.pvalue.TaggedOutput(FAILURES, unsent[element["key"]])
            elif shared_failure is not None and not results:
                yield beam.pvalue.TaggedOutput(FAILURES, {
                    **shared_failure, "key": element["key"], "source": element["source"]})
            else:
                outcome = self._outcome(element, results, shared=paid_by is not None)
                if isinstance(outcome, dict):
                    paid_by = element["key"]
                yield outcome

    def _outcome(self, element: dict, results: list, shared: bool):
        """The record's caption, its failure, or (fallback) the record for the online path.
        ``shared``: another record of the same fingerprint was given these answers already, so
        this one's are marked cached (paid once, counted once in summary.json)."""
        several = len(self._specs) > 1
        answers: list[Completion | CaptionError] = []
        answered = []  # the results that gave the answers
        for spec in self._specs:
            mine = [r for r in results if r[0] == (spec.name if several else None)]
            answer, result = self._pick(spec, mine, shared)
            answers.append(answer or CaptionError(
                "request", "not_submitted", "no batch holds this request: run the job with "
                "--resume to submit it", retryable=True))
            if result is not None:
                answered.append(result)
        if self._fallback and len(answered) < len(answers):
            return beam.pvalue.TaggedOutput(FALLBACK, element)
        # the batch that answered the first prompt (a failure: any batch, for the paid price)
        batch_id = answered[0][3] if answered else next((r[3] for r in results), None)
        outcome = record_outcome(
            element, self._specs, answers, model=self._config.client.model,
            settings_digest=self._config.settings_digest,
            finished_at=max((result[4] or 0 for result in answered), default=0),
            batch_id=batch_id)
        if outcome.failure is not None:
            return beam.pvalue.TaggedOutput(FAILURES, outcome.failure)
        return outcome.caption

    def _pick(self, spec, results: list, shared: bool
              ) -> tuple[Completion | CaptionError | None, tuple | None]:
        """The first result that is a usable answer (and that result), else the last error
        (None without any result); ``shared``: the answer is marked cached (see _outcome)."""
        error = None
        for result in sorted(results, key=lambda r: r[4] or 0):
            _, body, result_error, *_ = result
            if result_error is not None:
                error = result_error
                continue
            paid = None
            try:
                answer = read_completion(json.dumps(body).encode())
                tokens = answer.usage.prompt_tokens, answer.usage.completion_tokens
                if tokens != (None, None):  # billed, whatever becomes of the answer
                    paid = {"prompt_tokens": tokens[0] or 0, "completion_tokens": tokens[1] or 0,
                            **({"cached_tokens": answer.cached_tokens}
                               if answer.cached_tokens else {})}
                parsed = judge_completion(answer, self._config.client.max_caption_chars)
                check = self._checks[spec.name]
                value = parsed.caption if check is None else check(parsed.caption)
            except CaptionError as exc:  # a check's message quotes the answer: scrubbed
                error = CaptionError(exc.stage, exc.type, scrub(exc.message, self._secrets),
                                     exc.retryable, 1, paid=paid)
                continue
            return Completion(scrub_answer(value, self._secrets), parsed.finish_reason,
                              parsed.prompt_tokens, parsed.completion_tokens,
                              attempts=0 if shared else 1, latency_ms=result[5],
                              reasoning_tokens=parsed.reasoning_tokens, cached=shared,
                              cached_tokens=answer.cached_tokens), result
        return error, None


class CollectBatchResults(beam.PTransform):
    """The caption step of batch mode: keyed records in, ``{CAPTIONS, FAILURES, STATS}`` out
    (as CaptionImages), from the ended batches of the ledger (see the module)."""

    def __init__(self, config: WorkerConfig, output_dir: str, fallback: bool = False,
                 max_result_bytes: int = MAX_RESULT_BYTES):
        super().__init__()
        self._config = config
        self._output_dir = output_dir
        self._fallback = fallback
        self._max_result_bytes = max_result_bytes

    def expand(self, records: beam.PCollection[dict]) -> dict[str, beam.PCollection[dict]]:
        pipeline, digest = records.pipeline, self._config.settings_digest
        ledger = ledger_dir(self._output_dir)
        results = (pipeline
                   | "Ledger" >> beam.Create(match_files(f"{ledger}/*.json"))
                   | "Reshuffle" >> beam.Reshuffle()
                   | "Download" >> beam.ParDo(_DownloadResults(self._config,
                                                             self._max_result_bytes)))
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

