"""The batch ledger: what was submitted to the Batch API, kept in ``OUTDIR/batches/``.

One JSON file per uploaded input file, named by a digest of the requests it holds and
written (temp file, then rename) as soon as the upload returns, before the batch is created:
so a launcher or worker that dies at any point leaves either nothing (the upload is not used;
its records are submitted again) or an entry whose batch can be found again (by its input file
id), never a paid batch nobody collects; and a bundle a runner retries finds its file already
recorded instead of submitting it again. An entry holds the custom ids it covers (``KEY`` or
``KEY|PROMPT`` with several prompts) and, for each, the record's fingerprint (its content
under the answer settings, as ``--resume`` matches captions): answers are joined to records by
fingerprint, so an edited manifest or changed settings never get another record's answer.
A retry pass names its files with the batches it retries as well: the same requests submitted
again get a new entry, while a retry pass run again after a crash finds its own.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field

import fsspec

from beam_caption.core.batch_api import ENDED_STATUSES, INVALID, BatchState

LEDGER_DIR = "batches"
UNSENT_PREFIX = "unsent"  # failures of records that could not be prepared, per run
TIMEOUT = "timeout"  # our end of a batch not ended within --batch_max_wait_hours
TERMINAL = (*ENDED_STATUSES, INVALID, TIMEOUT)
FAILED_ENDS = ("failed", "expired", "cancelled", INVALID, TIMEOUT)  # may leave requests unanswered
PROMPT_SEPARATOR = "|"
# LedgerEntry.cancel of a given-up (timeout or invalid) batch: the API took the cancel and the
# batch's end (with what it answered) is awaited; that end came or is no longer awaited; the
# cancel failed. Each is written as it happens: a batch is asked to cancel once.
CANCEL_ASKED, CANCEL_ENDED, CANCEL_FAILED = "asked", "ended", "failed"


def entry_name(custom_ids: list[str], fingerprints: list[str], retry_of: str = "") -> str:
    """The ledger name of an input file: a digest of the requests it holds (and, in a retry
    pass, of ``retry_of``: the batches it retries)."""
    held = [custom_ids, fingerprints, retry_of] if retry_of else [custom_ids, fingerprints]
    return hashlib.sha256(json.dumps(held).encode("utf-8")).hexdigest()[:32]


def custom_id(key: str, prompt: str | None) -> str:
    """A request's custom_id: the record's key, and its prompt's name when there are several."""
    return key if prompt is None else f"{key}{PROMPT_SEPARATOR}{prompt}"


def split_custom_id(value: str, several_prompts: bool) -> tuple[str, str | None]:
    """(record key, prompt name or None) of a custom_id."""
    if not several_prompts:
        return value, None
    key, _, prompt = value.rpartition(PROMPT_SEPARATOR)
    return key, prompt


@dataclass
class LedgerEntry:
    """One uploaded input file and the batch made of it."""

    name: str  # entry_name of its requests: the ledger file's name
    file_id: str
    custom_ids: list[str]
    fingerprints: list[str]  # of each custom id's record
    uploaded_at: float
    estimated_cost: float = 0.0
    batch_id: str | None = None
    status: str = "uploaded"  # then the batch's: validating, in_progress, ..., completed
    output_file_id: str | None = None
    error_file_id: str | None = None
    ended_at: float | None = None
    errors: list[str] = field(default_factory=list)  # why a failed batch failed
    request_counts: dict = field(default_factory=dict)
    cancel: str = ""  # of a given-up batch: CANCEL_ASKED, CANCEL_ENDED or CANCEL_FAILED
    cancel_asked_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def needs_cancel(self) -> bool:
        """A batch we gave up (timeout, invalid) that was not asked to cancel yet."""
        return self.status in (TIMEOUT, INVALID) and self.batch_id is not None \
            and not self.cancel

    @property
    def settled(self) -> bool:
        """Ended, and not a cancelled batch whose end is still awaited."""
        return self.ended and self.cancel != CANCEL_ASKED

    def update(self, batch: BatchState) -> None:
        """Take the batch's id, status, result files and counts as the API shows them (an id
        or file the object lacks is kept as known)."""
        self.batch_id = batch.id or self.batch_id
        self.status = batch.status
        self.output_file_id = batch.output_file_id or self.output_file_id
        self.error_file_id = batch.error_file_id or self.error_file_id
        self.request_counts = dict(batch.request_counts)
        self.ended_at = batch.ended_at or (time.time() if self.ended else None)
        self.errors = list(batch.errors or batch.problems)

    def give_up(self, why: str) -> None:
        """End a batch that did not end in time: what it answered so far is collected."""
        self.status = TIMEOUT
        self.ended_at = time.time()
        self.errors = [why]

    def cancel_taken(self, batch: BatchState) -> None:
        """The API took the cancel of this given-up batch (``batch``: its answer)."""
        self.cancel = CANCEL_ASKED
        self.cancel_asked_at = time.time()
        self.errors.append("cancelled")
        self.after_cancel(batch)

    def after_cancel(self, batch: BatchState) -> None:
        """Take the result files and counts a cancelled batch shows (its status stays ours:
        what it did not answer fails as given up); once it ended, or cannot be followed, its
        files are final."""
        self.output_file_id = batch.output_file_id or self.output_file_id
        self.error_file_id = batch.error_file_id or self.error_file_id
        self.request_counts = dict(batch.request_counts) or self.request_counts
        if batch.status in TERMINAL:
            self.cancel = CANCEL_ENDED


def ledger_dir(output_dir: str) -> str:
    return f"{output_dir.rstrip('/')}/{LEDGER_DIR}"


def write_entry(output_dir: str, entry: LedgerEntry) -> None:
    """Write ``entry`` whole or not at all (temp file, then rename)."""
    fs, root = fsspec.core.url_to_fs(ledger_dir(output_dir))
    fs.makedirs(root, exist_ok=True)
    final = f"{root}/{entry.name}.json"
    temp = f"{root}/.{entry.name}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(temp, json.dumps(asdict(entry)).encode("utf-8"))
    fs.mv(temp, final)


def read_entries(output_dir: str) -> list[LedgerEntry]:
    """Every entry of the ledger, oldest upload first."""
    fs, root = fsspec.core.url_to_fs(ledger_dir(output_dir))
    paths = fs.glob(f"{root}/*.json")
    entries = [LedgerEntry(**json.loads(fs.cat_file(path))) for path in paths]
    return sorted(entries, key=lambda entry: entry.uploaded_at)


def entry_exists(output_dir: str, name: str) -> bool:
    fs, root = fsspec.core.url_to_fs(ledger_dir(output_dir))
    return fs.exists(f"{root}/{name}.json")


def read_entry(path: str) -> LedgerEntry:
    with fsspec.open(path, "rt", encoding="utf-8") as handle:
        return LedgerEntry(**json.load(handle))
