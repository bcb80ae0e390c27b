"""The fake server's Batch API: ``/v1/files`` and ``/v1/batches`` as OpenAI serves them.

An uploaded batch input file is a JSONL of chat requests (``custom_id``, ``method``, ``url``,
``body``). A batch ends ``batch_delay_s`` after its creation: then each line is answered as the
chat endpoint answers it (content-derived captions), successes go to the output file and the
rest (400s, lines whose prompt holds ``batch_fail_marker``: 500) to the error file. With
``batch_expire`` a batch expires instead: its first half of lines answered, the rest in the
error file as ``batch_expired``. Uploads and batches are counted in ``stats()["events"]``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from beam_caption.testing.fake_vlm import FakeVLMServer

CHAT_URL = "/v1/chat/completions"
_EXPIRED = {"code": "batch_expired",
            "message": "This request could not be executed before the completion window "
                       "expired."}


class FakeBatchAPI:
    """Files and batches held in memory by one fake server."""

    def __init__(self, server: FakeVLMServer):
        self._server = server
        self._files: dict[str, bytes] = {}
        self._batches: dict[str, dict[str, Any]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/files", self._upload),
                web.get("/v1/files/{file_id}/content", self._content),
                web.post("/v1/batches", self._create),
                web.get("/v1/batches", self._list),
                web.get("/v1/batches/{batch_id}", self._retrieve)]

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

    async def _content(self, request: web.Request) -> web.Response:
        refused = self._server.refusal(request)
        if refused is not None:
            return refused
        data = self._files.get(request.match_info["file_id"])
        if data is None:
            return _error(404, "No such file.")
        return web.Response(body=data, content_type="application/octet-stream")

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
        lines = self._files[body["input_file_id"]].splitlines()
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        self._batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": CHAT_URL, "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": "24h",
            "status": "in_progress", "output_file_id": None, "error_file_id": None,
            "created_at": int(time.time()), "in_progress_at": int(time.time()),
            "completed_at": None, "expired_at": None, "metadata": body.get("metadata"),
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "_ends_at": time.monotonic() + self._server.config.batch_delay_s}
        return web.json_response(self._public(batch_id))

    async def _retrieve(self, request: web.Request) -> web.Response:
        refused = self._server.refusal(request)
        if refused is not None:
            return refused
        batch_id = request.match_info["batch_id"]
        if batch_id not in self._batches:
            return _error(404, "No such batch.")
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
        if batch["status"] == "in_progress" and time.monotonic() >= batch["_ends_at"]:
            self._end(batch)
        return {key: value for key, value in batch.items() if not key.startswith("_")}

    def _end(self, batch: dict) -> None:
        lines = [json.loads(line) for line in self._files[batch["input_file_id"]].splitlines()
                 if line.strip()]
        answered = lines[:len(lines) // 2] if self._server.config.batch_expire else lines
        output: list[dict] = []
        errors: list[dict] = []
        for line in answered:
            status, body = self._answer(line)
            result = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": uuid.uuid4().hex,
                                   "body": body}, "error": None}
            (output if status == 200 else errors).append(result)
        for line in lines[len(answered):]:
            errors.append({"id": f"batch_req_{uuid.uuid4().hex[:16]}",
                           "custom_id": line["custom_id"], "response": None, "error": _EXPIRED})
        now = int(time.time())
        expired = self._server.config.batch_expire
        batch.update(status="expired" if expired else "completed",
                     completed_at=None if expired else now, expired_at=now if expired else None,
                     request_counts={"total": len(lines), "completed": len(output),
                                     "failed": len(errors)},
                     output_file_id=self._store(_jsonl(output)) if output else None,
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
