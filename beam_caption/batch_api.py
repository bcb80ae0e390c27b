"""The Batch API's calls (``/v1/files``, ``/v1/batches``) through the openai SDK.

Few, large and slow calls, where the SDK's cost per call does not matter: it retries
connection errors, 408, 409, 429 and 5xx with backoff (``max_retries``); anything else is a
``BatchAPIError`` whose message names the call and carries no key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, Any, Final, TypeVar

import openai

from beam_caption.client import NO_KEY, error_message
from beam_caption.redact import redact_url, scrub

CHAT_ENDPOINT: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"
UPLOAD_TIMEOUT_S = 900.0  # a 200 MB input file on a slow link
LIST_PAGE = 100
FIND_SLACK_S = 3600  # batches are listed newest first: stop this long before the upload
CREATE_ATTEMPTS = 5
CREATE_BACKOFF_S = 1.0

T = TypeVar("T")


class BatchAPIError(Exception):
    """A Batch API call failed for good (after the SDK's retries)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class BatchAPI:
    """Upload input files, create, find and retrieve batches, download result files."""

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

    def create(self, input_file_id: str, metadata: dict[str, str]) -> dict:
        """Create a batch of the chat requests in ``input_file_id``, once.

        The SDK would retry a create whose answer was lost (a timeout, a 502) and make a
        second paid batch of the same file: each attempt here is sent without retries, and
        after a failure that may have created it, the batch is looked for before another try.
        """
        once = self._client.with_options(max_retries=0)
        attempts = 0
        while True:
            try:
                return self._call(f"creating a batch of {input_file_id}", lambda: once.batches
                                  .create(input_file_id=input_file_id, endpoint=CHAT_ENDPOINT,
                                          completion_window=COMPLETION_WINDOW,
                                          metadata=metadata)).model_dump()
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

    def retrieve(self, batch_id: str) -> dict:
        return self._call(f"reading batch {batch_id}",
                          lambda: self._client.batches.retrieve(batch_id)).model_dump()

    def find(self, input_file_id: str, uploaded_at: float) -> dict | None:
        """The batch created of ``input_file_id`` (after ``uploaded_at``), if there is one."""
        def search() -> dict | None:
            for batch in self._client.batches.list(limit=LIST_PAGE):  # newest first, paged
                if batch.input_file_id == input_file_id:
                    return batch.model_dump()
                if batch.created_at < uploaded_at - FIND_SLACK_S:
                    return None
            return None

        return self._call(f"looking for the batch of {input_file_id}", search)

    def download(self, file_id: str) -> bytes:
        return self._call(f"downloading {file_id}",
                          lambda: self._client.files.content(file_id).content)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except openai.APIStatusError as exc:
            body: Any = exc.body
            raise BatchAPIError(scrub(f"{what} at {self._where} failed: HTTP {exc.status_code}: "
                                      f"{error_message(body)}", self._secrets),
                                exc.status_code) from None
        except openai.OpenAIError as exc:
            raise BatchAPIError(scrub(f"{what} at {self._where} failed: "
                                      f"{type(exc).__name__}: {exc}", self._secrets)) from None


