"""The Batch API's calls (``/v1/files``, ``/v1/batches``) through the openai SDK.

Few, large and slow calls, where the SDK's cost per call does not matter: it retries
connection errors, 408, 409, 429 and 5xx with backoff (``max_retries``); anything else is a
``BatchAPIError`` whose message names the call and carries no key. Batch objects are read as
plain JSON and checked by ``batch_state`` (the one place that trusts their shape); result files
are streamed to a file the caller holds, up to a byte cap.
"""

from __future__ import annotations

import io
import math
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Final, TypeVar

import httpx2
import openai

from beam_caption.core.client import NO_KEY, error_message
from beam_caption.core.redact import redact_url, scrub

CHAT_ENDPOINT: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"
UPLOAD_TIMEOUT_S = 900.0  # a 200 MB input file on a slow link
UPLOAD_LIMIT_BYTES = 200_000_000  # the largest input file the API takes
LIST_PAGE = 100
FIND_SLACK_S = 3600  # batches are listed newest first: stop this long before the upload
CREATE_ATTEMPTS = 5
CREATE_BACKOFF_S = 1.0
MAX_LIST_PAGES = 100  # find() reads at most this many pages of batches
CANCEL_RETRIES = 2  # a cancel is best effort: the SDK's retries of it, bounded
CANCEL_TIMEOUT_S = 60.0
DOWNLOAD_CHUNK = 1 << 20
# The documented batch statuses; the first four are ends.
ENDED_STATUSES: Final = ("completed", "failed", "expired", "cancelled")
STATUSES: Final = (*ENDED_STATUSES, "validating", "in_progress", "finalizing", "cancelling")
INVALID: Final = "invalid"  # the status of a batch object without a usable id or status
_MAX_ID_CHARS = 256
_MAX_ERRORS = 5
_MAX_ERROR_CHARS = 500
_END_TIMES = ("completed_at", "failed_at", "expired_at", "cancelled_at")

T = TypeVar("T")


@dataclass(frozen=True)
class BatchState:
    """A batch as the API showed it, every field of the documented type: a field of another
    type is left out and named in ``problems``; without a usable id or status the status is
    ``invalid`` (an end: the batch cannot be followed)."""

    id: str | None
    status: str
    input_file_id: str | None = None
    created_at: float | None = None
    ended_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: tuple[str, ...] = ()
    request_counts: dict[str, int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def short_repr(value: object) -> str:
    """A short, safe rendering of an unexpected value for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def batch_state(raw: object) -> BatchState:
    """The one check of a batch object's shape (see BatchState)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        return BatchState(None, INVALID, problems=(f"the batch object is {short_repr(raw)}",))

    def text(name: str) -> str | None:
        value = raw.get(name)
        if value is None or (isinstance(value, str) and 0 < len(value) <= _MAX_ID_CHARS):
            return value
        problems.append(f"{name} {short_repr(value)} is not an id")
        return None

    def unix_time(name: str) -> float | None:
        value = raw.get(name)
        if value is None:
            return None
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value) and value >= 0:
            return float(value)
        problems.append(f"{name} {short_repr(value)} is not a unix time")
        return None

    batch_id = text("id")
    status = raw.get("status")
    if status not in STATUSES:
        problems.append(f"status {short_repr(status)} is not one of {', '.join(STATUSES)}")
        status = INVALID
    if batch_id is None:
        problems.append("the batch object has no id")
        status = INVALID
    ends = [unix_time(name) for name in _END_TIMES]
    counts = raw.get("request_counts")
    if not isinstance(counts, dict | None):
        problems.append(f"request_counts {short_repr(counts)} is not an object")
        counts = None
    request_counts: dict[str, int] = {}
    for name in ("total", "completed", "failed"):
        value = (counts or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            request_counts[name] = value
        elif value is not None:
            problems.append(f"request_counts.{name} {short_repr(value)} is not a count")
    errors = raw.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    if errors is not None and not isinstance(data, list | None):
        problems.append(f"errors {short_repr(errors)} is not a list object")
    messages = tuple(
        str(error.get("message") or error.get("code"))[:_MAX_ERROR_CHARS]
        for error in (data or [])[:_MAX_ERRORS] if isinstance(error, dict))
    return BatchState(
        id=batch_id, status=status, input_file_id=text("input_file_id"),
        created_at=unix_time("created_at"), ended_at=next((t for t in ends if t), None),
        output_file_id=text("output_file_id"), error_file_id=text("error_file_id"),
        errors=messages, request_counts=request_counts, problems=tuple(problems))


def _path_part(batch_id: str) -> str:
    """A batch id from the API as one path segment (an id holding ``/`` or ``?`` names no
    other endpoint)."""
    return urllib.parse.quote(batch_id, safe="")


class BatchAPIError(Exception):
    """A Batch API call failed for good (after the SDK's retries)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class BatchAPI:
    """Upload input files, create, find, retrieve and cancel batches, download result files."""

    def __init__(self, api_url: str, api_key: str | None, max_retries: int = 6):
        self._where = redact_url(api_url)
        self._secrets = (api_key,) if api_key else ()
        self._client = openai.OpenAI(base_url=api_url, api_key=api_key or NO_KEY,
                                     max_retries=max_retries, timeout=UPLOAD_TIMEOUT_S)

    def upload(self, data: bytes | IO[bytes], name: str) -> str:
        """Upload a batch input file (bytes or a binary file object); its file id."""
        uploaded = self._call(f"uploading {name}", lambda: self._client.files.create(
            file=(name, data, "application/jsonl"), purpose="batch"))
        return uploaded.id

    def create(self, input_file_id: str, metadata: dict[str, str]) -> BatchState:
        """Create a batch of the chat requests in ``input_file_id``, once.

        The SDK would retry a create whose answer was lost (a timeout, a 502) and make a
        second paid batch of the same file: each attempt here is sent without retries, and
        after a failure that may have created it, the batch is looked for before another try.
        An answer without a usable id is looked for the same way, never created again.
        """
        once = self._client.with_options(max_retries=0)
        what = f"creating a batch of {input_file_id}"
        attempts = 0
        while True:
            try:
                created = batch_state(self._call(what, lambda: once.post(
                    "/batches", cast_to=object, body={
                        "input_file_id": input_file_id, "endpoint": CHAT_ENDPOINT,
                        "completion_window": COMPLETION_WINDOW, "metadata": metadata})))
                if created.id is not None:
                    return created
                found = self.find(input_file_id, time.time())
                if found is not None:
                    return found
                raise BatchAPIError(f"{what} at {self._where}: the answer has no usable batch "
                                    f"({'; '.join(created.problems)})")
            except BatchAPIError as exc:
                attempts += 1
                refused = exc.status is not None and exc.status < 500 and \
                    exc.status not in (408, 409, 429)  # nothing was created
                if refused or attempts >= CREATE_ATTEMPTS:
                    raise
            time.sleep(CREATE_BACKOFF_S * 2 ** (attempts - 1))
            found = self.find(input_file_id, time.time())
            if found is not None:
                return found

    def retrieve(self, batch_id: str) -> BatchState:
        return batch_state(self._call(f"reading batch {batch_id}", lambda: self._client.get(
            f"/batches/{_path_part(batch_id)}", cast_to=object)))

    def cancel(self, batch_id: str) -> BatchState:
        """Ask the API to cancel a batch (``CANCEL_RETRIES`` retries at most); the batch as
        the answer shows it (``cancelling``, or already ended)."""
        bounded = self._client.with_options(max_retries=CANCEL_RETRIES, timeout=CANCEL_TIMEOUT_S)
        return batch_state(self._call(f"cancelling batch {batch_id}", lambda: bounded.post(
            f"/batches/{_path_part(batch_id)}/cancel", cast_to=object)))

    def find(self, input_file_id: str, uploaded_at: float) -> BatchState | None:
        """The batch created of ``input_file_id`` (after ``uploaded_at``), if there is one."""
        what = f"looking for the batch of {input_file_id}"
        after: str | None = None
        for _ in range(MAX_LIST_PAGES):  # newest first, paged
            params: dict[str, Any] = {"limit": LIST_PAGE, **({"after": after} if after else {})}
            page = self._list_page(what, params)
            listed = page.get("data") if isinstance(page, dict) else None
            if not isinstance(page, dict) or not isinstance(listed, list):
                return None
            batches = [batch_state(batch) for batch in listed]
            for batch in batches:
                if batch.input_file_id == input_file_id and batch.id is not None:
                    return batch
                if batch.created_at is not None and batch.created_at < uploaded_at - FIND_SLACK_S:
                    return None
            after = batches[-1].id if batches else None
            if not (page.get("has_more") is True and after):
                return None
        return None

    def _list_page(self, what: str, params: dict[str, Any]) -> object:
        return self._call(what, lambda: self._client.get("/batches", cast_to=object,
                                                         options={"params": params}))

    def download_to(self, file_id: str, sink: IO[bytes], max_bytes: int) -> bool:
        """Stream a file's content into ``sink``, at most ``max_bytes``; whether it all came."""
        def stream() -> bool:
            written = 0
            with self._client.files.with_streaming_response.content(file_id) as response:
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                    if written + len(chunk) > max_bytes:
                        sink.write(chunk[:max_bytes - written])
                        return False
                    sink.write(chunk)
                    written += len(chunk)
            return True

        return self._call(f"downloading {file_id}", stream)

    def download(self, file_id: str, max_bytes: int = UPLOAD_LIMIT_BYTES) -> bytes:
        """A (small) file's content; BatchAPIError when it is over ``max_bytes``."""
        sink = io.BytesIO()
        if not self.download_to(file_id, sink, max_bytes):
            raise BatchAPIError(f"downloading {file_id} at {self._where}: over {max_bytes} bytes")
        return sink.getvalue()

    def _call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except openai.APIStatusError as exc:
            body: Any = exc.body
            raise BatchAPIError(scrub(f"{what} at {self._where} failed: HTTP {exc.status_code}: "
                                      f"{error_message(body)}", self._secrets),
                                exc.status_code) from None
        except (openai.OpenAIError, httpx2.HTTPError, OSError) as exc:
            raise BatchAPIError(scrub(f"{what} at {self._where} failed: "
                                      f"{type(exc).__name__}: {exc}", self._secrets)) from None


