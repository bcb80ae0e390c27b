"""The fake server's Batch API: ``/v1/files`` and ``/v1/batches`` as OpenAI serves them.

An uploaded batch input file is a JSONL of chat requests (``custom_id``, ``method``, ``url``,
``body``). A batch ends ``batch_delay_s`` after its creation: then each line is answered as the
chat endpoint answers it (content-derived captions), successes go to the output file and the
rest (400s, lines whose prompt holds ``batch_fail_marker``: 500) to the error file. With
``batch_expire`` a batch expires instead: its first half of lines answered, the rest in the
error file as ``batch_expired``. A batch not ended can be cancelled: it shows ``cancelling``,
then ``cancelled`` with the first half of its lines answered (one that had already answered
everything keeps its files). Uploads, batches and cancel calls are counted in
``stats()["events"]`` (``upload``, ``batch``, ``cancel``).

Hostile modes (``BatchModes``), set while the server runs with ``set_batch_modes(server.url,
...)`` (``POST /fake/batch_modes``): the first batches expire unanswered, result lines of
undocumented shapes, batch objects with wrong fields, batches that never end (or only when
cancelled), result files that never end, cancels that fail.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
import uuid
from typing import Any, Protocol

from aiohttp import web

CHAT_URL = "/v1/chat/completions"
_EXPIRED = {"code": "batch_expired",
            "message": "This request could not be executed before the completion window "
                       "expired."}
_PADDING = b'{"custom_id": "padding", "response": null, "error": null}\n' * 1024
_ENDLESS_MAX_BYTES = 2 << 30  # even an endless body ends somewhere


async def endless_body(request: web.Request, content_type: str, head: bytes,
                       chunk: bytes) -> web.StreamResponse:
    """A 200 answer of ``head`` and then ``chunk`` again and again, until the client goes or
    _ENDLESS_MAX_BYTES are sent: a body that never ends, for the readers' bounds."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    await response.write(head)
    sent = 0
    while (sent < _ENDLESS_MAX_BYTES and request.transport is not None
           and not request.transport.is_closing()):
        await response.write(chunk)
        sent += len(chunk)
    return response


@dataclasses.dataclass
class BatchModes:
    """Hostile Batch API behaviour (all off by default)."""

    expire_first: int = 0  # the first N batches created (from now on) expire unanswered
    # The Nth result line of every batch (in input order) gets these fields replaced, e.g.
    # {"custom_id": ["x"]}, {"response": "text"}, {"response": None, "error": "text"}:
    line_fields: list[dict] = dataclasses.field(default_factory=list)
    extra_lines: list[str] = dataclasses.field(default_factory=list)  # raw lines put first
    batch_fields: dict = dataclasses.field(default_factory=dict)  # replace the batch object's
    stuck_status: str | None = None  # batches show this status (results still made) until
    # they are cancelled
    hold: bool = False  # batches created (from now on) stay in_progress until cancelled
    cancel_status: int = 0  # cancel calls are answered with this HTTP error status
    endless_results: bool = False  # result files are padding lines that never end


def set_batch_modes(api_url: str, **modes: Any) -> None:
    """Set a running fake server's BatchModes (fields not given are reset to off)."""
    base = api_url.rstrip("/").removesuffix("/v1")
    request = urllib.request.Request(f"{base}/fake/batch_modes", method="POST",
                                     data=json.dumps(modes).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


class BatchHost(Protocol):
    """What the Batch API needs of the fake server that serves it (fake_vlm.FakeVLMServer)."""

    config: Any  # batch_delay_s, batch_expire, batch_fail_marker

    def refusal(self, request: web.Request) -> web.Response | None: ...

    def count_event(self, kind: str) -> None: ...

    def answer_line(self, raw: bytes) -> tuple[int, dict]: ...


class FakeBatchAPI:
    """Files and batches held in memory by one fake server."""

    def __init__(self, server: BatchHost):
        self._server = server
        self._files: dict[str, bytes] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._modes = BatchModes()
        self._created = 0

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/fake/batch_modes", self._set_modes),
                web.post("/v1/files", self._upload),
                web.get("/v1/files/{file_id}/content", self._content),
                web.post("/v1/batches", self._create),
                web.get("/v1/batches", self._list),
                web.get("/v1/batches/{batch_id}", self._retrieve),
                web.post("/v1/batches/{batch_id}/cancel", self._cancel)]

    async def _set_modes(self, request: web.Request) -> web.Response:
        self._modes = BatchModes(**await request.json())
        self._created = 0
        return web.json_response(dataclasses.asdict(self._modes))

    def _store(self, data: bytes) -> str:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self._files[file_id] = data
        return file_id

    async def _upload(self, request: web.Request) -> web.Response:
        refused = self._server.refusal(request)
        if refused is not None:
            return refused
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or not isinstance(upload, web.FileField):
            return _error(400, "Expected purpose=batch and a file.")
        data = upload.file.read()
        self._server.count_event("upload")
        file_id = self._store(data)
        return web.json_response({"id": file_id, "object": "file", "bytes": len(data),
                                  "created_at": int(time.time()), "filename": upload.filename,
                                  "purpose": "batch", "status": "processed"})

    async def _content(self, request: web.Request) -> web.StreamResponse:
        refused = self._server.refusal(request)
        if refused is not None:
            return refused
        data = self._files.get(request.match_info["file_id"])
        if data is None:
            return _error(404, "No such file.")
        if self._modes.endless_results and request.match_info["file_id"] in self._results:
            return await self._endless(request)
        return web.Response(body=data, content_type="application/octet-stream")

    @property
    def _results(self) -> set[str]:
        return {batch[name] for batch in self._batches.values()
                for name in ("output_file_id", "error_file_id") if batch[name]}

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        """A result file that never ends (until the client goes or 2 GiB are sent)."""
        return await endless_body(request, "application/octet-stream", b"", _PADDING)

    async def _create(self, request: web.Request) -> web.Response:
        refused = self._server.refusal(request)
        if refused is not None:
            return refused
        body = await request.json()
        if body.get("input_file_id") not in self._files:
            return _error(400, "input_file_id does not name an uploaded file.")
        if body.get("endpoint") != CHAT_URL or body.get("completion_window") != "24h":
            return _error(400, f"endpoint must be {CHAT_URL} and completion_window 24h.")
        self._server.count_event("batch")
        self._created += 1
        lines = self._files[body["input_file_id"]].splitlines()
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        self._batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": CHAT_URL, "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": "24h",
            "status": "in_progress", "output_file_id": None, "error_file_id": None,
            "created_at": int(time.time()), "in_progress_at": int(time.time()),
            "completed_at": None, "expired_at": None, "metadata": body.get("metadata"),
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "_ends_at": time.monotonic() + self._server.config.batch_delay_s,
            "_expires": self._created <= self._modes.expire_first, "_held": self._modes.hold,
            "_cancelled": False}
        return web.json_response(self._public(batch_id))

    async def _retrieve(self, request: web.Request) -> web.Response:
        refused = self._server.refusal(request)
        if refused is not None:
            return refused
        batch_id = request.match_info["batch_id"]
        if batch_id not in self._batches:
            return _error(404, "No such batch.")
        return web.json_response(self._public(batch_id))

    async def _cancel(self, request: web.Request) -> web.Response:
        refused = self._server.refusal(request)
        if refused is not None:
            return refused
        self._server.count_event("cancel")
        if self._modes.cancel_status:
            return _error(self._modes.cancel_status, "The cancel failed (fake).")
        batch_id = request.match_info["batch_id"]
        if batch_id not in self._batches:
            return _error(404, "No such batch.")
        shown = self._public(batch_id)["status"]
        if shown in ("completed", "failed", "expired", "cancelled", "cancelling"):
            return _error(400, f"Cannot cancel a batch with status {shown}.")
        batch = self._batches[batch_id]
        batch["_cancelled"] = True
        if batch["status"] == "in_progress":  # ends (cancelled) at its next look
            batch.update(status="cancelling", cancelling_at=int(time.time()),
                         _ends_at=time.monotonic())
            return web.json_response(self._shown(batch))
        batch.update(status="cancelled", cancelled_at=int(time.time()), completed_at=None)
        return web.json_response(self._public(batch_id))

    async def _list(self, request: web.Request) -> web.Response:
        refused = self._server.refusal(request)
        if refused is not None:
            return refused
        ids = sorted(self._batches, key=lambda b: self._batches[b]["created_at"], reverse=True)
        after = request.query.get("after")
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        limit = int(request.query.get("limit", 20))
        page = [self._public(batch_id) for batch_id in ids[:limit]]
        return web.json_response({"object": "list", "data": page,
                                  "has_more": len(ids) > limit,
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None})

    def _public(self, batch_id: str) -> dict:
        """The batch as the API shows it, ended (and answered) once its time has come."""
        batch = self._batches[batch_id]
        ends = batch["status"] == "cancelling" or (batch["status"] == "in_progress"
                                                   and not batch["_held"])
        if ends and time.monotonic() >= batch["_ends_at"]:
            self._end(batch)
        return self._shown(batch)

    def _shown(self, batch: dict) -> dict:
        shown = {key: value for key, value in batch.items() if not key.startswith("_")}
        if self._modes.stuck_status and not batch["_cancelled"]:
            shown["status"] = self._modes.stuck_status
        return {**shown, **self._modes.batch_fields}

    def _end(self, batch: dict) -> None:
        lines = [json.loads(line) for line in self._files[batch["input_file_id"]].splitlines()
                 if line.strip()]
        cancelled = batch["_cancelled"]  # what it answered before the cancel: the first half
        expired = not cancelled and (self._server.config.batch_expire or batch["_expires"])
        answered = lines[:len(lines) // 2] if cancelled else [] if batch["_expires"] else \
            lines[:len(lines) // 2] if expired else lines
        output: list[dict] = []
        errors: list[dict] = []
        for index, line in enumerate(answered):
            status, body = self._answer(line)
            result = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": uuid.uuid4().hex,
                                   "body": body}, "error": None}
            if index < len(self._modes.line_fields):
                result.update(self._modes.line_fields[index])
            (output if status == 200 else errors).append(result)
        for line in [] if cancelled else lines[len(answered):]:
            errors.append({"id": f"batch_req_{uuid.uuid4().hex[:16]}",
                           "custom_id": line["custom_id"], "response": None, "error": _EXPIRED})
        extra = "".join(f"{line}\n" for line in self._modes.extra_lines).encode()
        now = int(time.time())
        ended_as = "cancelled" if cancelled else "expired" if expired else "completed"
        batch.update(status=ended_as, completed_at=now if ended_as == "completed" else None,
                     expired_at=now if expired else None,
                     cancelled_at=now if cancelled else None,
                     request_counts={"total": len(lines), "completed": len(output),
                                     "failed": len(errors)},
                     output_file_id=self._store(extra + _jsonl(output)) if output else None,
                     error_file_id=self._store(_jsonl(errors)) if errors else None)

    def _answer(self, line: dict) -> tuple[int, dict]:
        raw = json.dumps(line.get("body")).encode()
        marker = self._server.config.batch_fail_marker
        if marker and marker in raw.decode():
            return 500, {"error": {"message": "The server had an error processing this request "
                                              "(fake).", "type": "server_error"}}
        return self._server.answer_line(raw)


def _jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                         "param": None, "code": None}}, status=status)
