"""The launcher's preflight: transient answers retried within a ceiling, models the list omits
asked directly, non-API answers named in one line, and no secret in any message."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from typing import Self

import pytest
from aiohttp import web

from beam_caption.cli import preflight as preflight_module
from beam_caption.cli.preflight import preflight
from beam_caption.core.client import ClientSettings
from beam_caption.core.errors import PreflightError

KEY = "sk-test-secret-key-0123"
CLOSED_URL = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there


# -- a scripted server ------------------------------------------------------------------------

def reply(status=200, body=None, headers=None, text=None, content_type="application/json"):
    """An answer: ``body`` as JSON, or ``text`` as given."""
    async def answer(request):
        payload = json.dumps(body) if text is None else text
        return web.Response(status=status, text=payload, headers=headers,
                            content_type=content_type)
    return answer


def models(*ids):
    return reply(body={"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})


def error(status, message="nope", code=None, param=None, headers=None):
    return reply(status, {"error": {"message": message, "type": "error", "code": code,
                                    "param": param}}, headers)


def completion():
    return reply(body={"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "p"}, "finish_reason": "length"}]})


async def reset(request):
    request.transport.abort()
    raise asyncio.CancelledError  # aiohttp drops the connection without an answer


def hang(seconds):
    async def answer(request):
        await asyncio.sleep(seconds)
        return await models("m")(request)
    return answer


class ScriptedServer:
    """An OpenAI-style server on 127.0.0.1 whose routes give their scripted answers in order
    (the last one repeats), recording each request's path, arrival time, headers and body."""

    def __init__(self, models_answers=(), chat_answers=()):
        self.scripts = {"/v1/models": list(models_answers) or [models("m")],
                        "/v1/chat/completions": list(chat_answers) or [completion()]}
        self.requests: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()
        return self

    def __exit__(self, *exc_info) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _open(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/v1/models", self._handle),
                        web.post("/v1/chat/completions", self._handle)])
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request):
        body = await request.json() if request.can_read_body else None
        self.requests.append({"path": request.path, "at": time.monotonic(),
                              "headers": dict(request.headers), "body": body})
        script = self.scripts[request.path]
        return await (script.pop(0) if len(script) > 1 else script[0])(request)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def paths(self) -> list[str]:
        return [r["path"].rpartition("/")[2] for r in self.requests]

    def gaps(self) -> list[float]:
        times = [r["at"] for r in self.requests]
        return [b - a for a, b in itertools.pairwise(times)]


def check(url, model="m", api_key=KEY):
    preflight(ClientSettings(api_url=url, model=model), api_key)


def refusal(url, model="m", api_key=KEY) -> str:
    with pytest.raises(PreflightError) as info:
        check(url, model, api_key)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(preflight_module, "PREFLIGHT_BACKOFF_S", 0.05)


# -- 1. transient answers are retried ---------------------------------------------------------

@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_a_transient_answer_is_retried(status):
    with ScriptedServer([error(status, headers={"retry-after-ms": "10"}), models("m")]) as server:
        check(server.url)
    assert server.paths() == ["models", "models"]


@pytest.mark.parametrize("headers", [{"retry-after-ms": "300"}, {"Retry-After": "0.3"}])
def test_the_wait_the_server_asks_for_is_honoured(headers):
    with ScriptedServer([error(429, headers=headers), models("m")]) as server:
        check(server.url)
    assert server.gaps()[0] >= 0.3


def test_a_connection_reset_is_retried_with_growing_waits():
    with ScriptedServer([reset, reset, reset, models("m")]) as server:
        check(server.url)
    assert server.paths() == ["models"] * 4
    first, second, third = server.gaps()
    assert first >= 0.05 and second >= 0.1 and third >= 0.2


def test_a_timeout_is_retried(monkeypatch):
    monkeypatch.setattr(preflight_module, "PREFLIGHT_TIMEOUT_S", 0.3)
    with ScriptedServer([hang(3), models("m")]) as server:
        check(server.url)
    assert server.paths() == ["models", "models"]


def test_a_lasting_transient_answer_gives_up_after_the_attempt_ceiling():
    with ScriptedServer([error(503, "overloaded", headers={"retry-after-ms": "0"})]) as server:
        message = refusal(server.url)
    assert len(server.requests) == preflight_module.PREFLIGHT_MAX_ATTEMPTS
    assert message == (f"{server.url} answered HTTP 503: overloaded "
                       f"(after {preflight_module.PREFLIGHT_MAX_ATTEMPTS} attempts)")


def test_a_wait_beyond_the_ceiling_gives_up_at_once():
    started = time.monotonic()
    with ScriptedServer([error(429, "slow down", headers={"Retry-After": "120"})]) as server:
        message = refusal(server.url)
    assert time.monotonic() - started < 5
    assert len(server.requests) == 1
    assert "answered HTTP 429: slow down" in message
    assert "asked to wait 120 s" in message and "--skip_preflight" in message


def test_the_deadline_bounds_the_whole_preflight(monkeypatch):
    monkeypatch.setattr(preflight_module, "PREFLIGHT_DEADLINE_S", 1.0)
    monkeypatch.setattr(preflight_module, "PREFLIGHT_TIMEOUT_S", 0.2)
    started = time.monotonic()
    with ScriptedServer([error(503, headers={"retry-after-ms": "400"})]) as server:
        message = refusal(server.url)
    assert time.monotonic() - started < 1.0
    assert len(server.requests) == 2 and "asked to wait 0.4 s" in message


def test_the_model_is_not_asked_where_the_deadline_leaves_no_room(monkeypatch):
    monkeypatch.setattr(preflight_module, "PREFLIGHT_DEADLINE_S", 1.2)
    monkeypatch.setattr(preflight_module, "PREFLIGHT_TIMEOUT_S", 0.8)
    with ScriptedServer([hang(0.5)]) as server:
        message = refusal(server.url, model="llava")
    assert server.paths() == ["models"]
    assert message == (f"{server.url} answered too slowly to check model 'llava' within the "
                       "preflight's 1.2 s limit")


# -- 2. a model the list omits is asked directly ----------------------------------------------

@pytest.mark.parametrize("answer", [
    completion(),
    error(400, "Unsupported parameter: 'max_tokens' is not supported with this model.",
          code="unsupported_parameter", param="max_tokens"),
])
def test_a_model_the_list_omits_is_accepted_when_it_answers(answer):
    with ScriptedServer([models("llava:latest")], [answer]) as server:
        check(server.url, model="llava")
    assert server.paths() == ["models", "completions"]
    body = server.requests[1]["body"]
    assert body["model"] == "llava" and body["max_tokens"] == 1
    assert [type(m["content"]) for m in body["messages"]] == [str]  # text only, no image


@pytest.mark.parametrize("answer", [
    error(404, "The model `llava` does not exist.", code="model_not_found"),
    error(400, "invalid model name", code="model_not_found"),
    error(400, "unknown model", param="model"),
])
def test_a_model_the_list_omits_is_refused_when_the_server_does_not_know_it(answer):
    with ScriptedServer([models("llava:latest", "bakllava")], [answer]) as server:
        message = refusal(server.url, model="llava")
    assert server.paths() == ["models", "completions"]
    assert message == (f"model 'llava' is not served at {server.url} "
                       "(it serves: bakllava, llava:latest)")


@pytest.mark.parametrize("answer, shown", [
    (error(404, code="model_not_found"), "model 'm' was not found at {url} (HTTP 404)"),
    (error(400, "no model m", code="model_not_found"), "{url} answered HTTP 400: no model m"),
])
def test_a_server_without_a_model_list_is_asked_directly(answer, shown):
    with ScriptedServer([error(404)], [answer]) as server:
        message = refusal(server.url)
    assert server.paths() == ["models", "completions"]
    assert message == shown.format(url=server.url)


# -- 3. an answer that is not an OpenAI model list --------------------------------------------

@pytest.mark.parametrize("answer, shown", [
    (reply(text="<html><body>Welcome</body></html>", content_type="text/html"), "text/html"),
    (reply(text="ok", content_type="text/plain"), "text/plain"),
    (reply(text="", content_type="application/json"), "application/json that is not a model list"),
    (reply(body=[{"id": "m"}]), "application/json that is not a model list"),
    (reply(body={"data": "m"}), "application/json that is not a model list"),
    (reply(body={"data": [{"name": "m"}]}), "application/json that is not a model list"),
    (reply(body={"data": [{"id": 7}]}), "application/json that is not a model list"),
])
def test_an_answer_that_is_not_a_model_list_is_one_clear_line(answer, shown):
    with ScriptedServer([answer]) as server:
        message = refusal(server.url)
    assert message == (f"{server.url} did not answer like an OpenAI-compatible API "
                       f"(GET /models returned {shown}); check --api_url ends in /v1")


# -- 4. no secret in any message --------------------------------------------------------------

async def echo_auth(request):
    header = request.headers.get("Authorization", "")
    message = f"bad header Authorization: {header}; key {header[7:]} unknown"
    return await error(400, message)(request)


async def echo_auth_503(request):
    header = request.headers.get("Authorization", "")
    return await error(503, f"busy for key {header[7:]}", headers={"retry-after-ms": "0"})(request)


@pytest.mark.parametrize("models_answers, chat_answers", [
    ([echo_auth], []),
    ([echo_auth_503], []),
    ([error(404)], [echo_auth_503]),
])
def test_a_server_that_echoes_the_key_does_not_get_it_printed(models_answers, chat_answers):
    with ScriptedServer(models_answers, chat_answers) as server:
        message = refusal(server.url)
    assert KEY not in message and "[REDACTED]" in message


@pytest.mark.parametrize("answer", [error(401), error(403), error(500)])
def test_url_credentials_are_not_printed(answer):
    with ScriptedServer([answer]) as server:
        message = refusal(server.url.replace("//", "//user:hunter2@"))
    assert "hunter2" not in message and f"//REDACTED@127.0.0.1:{server.port}/v1" in message


def test_url_credentials_are_not_printed_when_unreachable():
    message = refusal(CLOSED_URL.replace("//", "//user:hunter2@"))
    assert message.startswith("cannot reach http://REDACTED@127.0.0.1:9/v1")
    assert "hunter2" not in message


def test_a_mounted_key_loses_its_newline():
    async def needs_key(request):
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return await error(401)(request)
        return await models("m")(request)

    with ScriptedServer([needs_key]) as server:
        check(server.url, api_key=KEY + "\n")


@pytest.mark.parametrize("key", ["sk-test-secret\nkey-0123", "sk-test-secret-kéy-0123",
                                 "sk-test-secret\x00key-0123"])
def test_a_key_no_header_can_carry_is_refused_without_printing_it(key):
    with ScriptedServer() as server:
        message = refusal(server.url, api_key=key)
    assert server.requests == []
    assert "secret" not in message and "key-0123" not in message
    assert "API key" in message
