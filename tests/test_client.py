import asyncio
import base64
import io
import json
import random

import pytest
from PIL import Image

from beam_caption.client import (ClientSettings, VLMClient, backoff_delay, parse_completion,
                                 request_body, retry_after_seconds)
from beam_caption.errors import CaptionError
from beam_caption.testing.fake_vlm import FakeVLMConfig, FakeVLMServer

def _red_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), (255, 0, 0)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED_PNG = _red_png()


def messages(text="Describe.", url=RED_PNG):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_request_body_is_compact_json_with_the_parameters_that_are_set():
    plain = request_body(ClientSettings(api_url="u", model="m"), messages())
    assert json.loads(plain) == {"model": "m", "messages": messages()}
    assert b" " not in plain.replace(b"Describe.", b"")  # no padding around separators
    tuned = request_body(ClientSettings(api_url="u", model="m", max_tokens=64, temperature=0.0),
                         messages())
    assert json.loads(tuned) == {"model": "m", "messages": messages(), "max_tokens": 64,
                                 "temperature": 0.0}


def completion_body(content="A cat.", finish="stop"):
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                    "finish_reason": finish}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 3}}).encode()


def test_parse_completion_reads_caption_and_usage():
    assert parse_completion(completion_body(" A cat. ")) == ("A cat.", "stop", 10, 3)


@pytest.mark.parametrize("body, error_type", [
    (b"", "empty_response"),
    (b'{"id": "x", "choices": [', "malformed_response"),
    (b"<html>gateway</html>", "malformed_response"),
    (b'{"object": "list"}', "not_a_completion"),
    (b'{"choices": []}', "not_a_completion"),
    (completion_body("   "), "empty_caption"),
])
def test_bad_bodies_are_retryable_response_errors(body, error_type):
    with pytest.raises(CaptionError) as info:
        parse_completion(body)
    assert (info.value.stage, info.value.type, info.value.retryable) == ("response", error_type, True)


def test_retry_after_headers():
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({"retry-after-ms": "x", "retry-after": "2"}) == 2.0


def test_backoff_is_full_jitter_capped_and_honours_retry_after():
    settings = ClientSettings(api_url="u", model="m", initial_backoff=1.0, max_backoff=8.0)
    rng = random.Random(1)
    delays = [backoff_delay(5, settings, None, rng) for _ in range(200)]
    assert all(0 <= d <= 8.0 for d in delays) and max(delays) > 6 and min(delays) < 2
    assert all(0 <= backoff_delay(0, settings, None, rng) <= 1.0 for _ in range(50))
    assert backoff_delay(0, settings, 5.0, rng) >= 5.0
    assert backoff_delay(0, settings, 100.0, rng) == 8.0


def run_complete(server, msgs, **settings):
    async def go():
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm",
                                          initial_backoff=0.01, **settings), api_key="k", seed=0)
        try:
            return await client.complete(request_body(client.settings, msgs))
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_success_reports_caption_tokens_and_one_attempt():
    with FakeVLMServer(FakeVLMConfig()) as server:
        result = run_complete(server, messages())
    assert result.caption == "A fake caption: landscape image, colour #ff0000"
    assert result.attempts == 1 and result.prompt_tokens > 0 and result.completion_tokens > 0


def test_retryable_status_is_retried_per_request_and_counted():
    with FakeVLMServer(FakeVLMConfig(fail_first=2, fail_first_status=503)) as server:
        result = run_complete(server, messages())
        assert server.stats()["requests"] == 3
    assert result.attempts == 3


def test_retries_run_out_with_the_last_error():
    with FakeVLMServer(FakeVLMConfig(fail_first=10, fail_first_status=500)) as server:
        with pytest.raises(CaptionError) as info:
            run_complete(server, messages(), max_retries=2)
        assert server.stats()["requests"] == 3
    assert (info.value.type, info.value.attempts, info.value.retryable) == ("http_500", 3, True)


def test_permanent_errors_are_not_retried():
    with FakeVLMServer(FakeVLMConfig()) as server:
        with pytest.raises(CaptionError) as info:
            run_complete(server, messages(text="REJECT_400 this"))
        assert server.stats()["requests"] == 1
    assert (info.value.stage, info.value.type, info.value.retryable) == ("request", "content_policy", False)


def test_hang_times_out_and_retries_within_the_timeout():
    with FakeVLMServer(FakeVLMConfig(rate_hang=1.0, hang_seconds=30)) as server:
        with pytest.raises(CaptionError) as info:
            run_complete(server, messages(), request_timeout=0.3, max_retries=1)
    assert (info.value.type, info.value.attempts) == ("timeout", 2)


def test_retry_after_is_honoured():
    with FakeVLMServer(FakeVLMConfig(rate_429=1.0, retry_after_ms=300)) as server:
        loop = asyncio.new_event_loop()
        started = loop.time()
        with pytest.raises(CaptionError) as info:
            loop.run_until_complete(_complete_on(loop, server, max_retries=2))
        elapsed = loop.time() - started
        loop.close()
    assert info.value.type == "http_429" and info.value.attempts == 3
    assert elapsed >= 0.6  # two waits of at least retry-after-ms


async def _complete_on(loop, server, **settings):
    client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm",
                                      initial_backoff=0.001, **settings), api_key=None, seed=0)
    try:
        return await client.complete(request_body(client.settings, messages()))
    finally:
        await client.aclose()


def test_concurrency_is_bounded_by_max_concurrency():
    async def go(server):
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm", max_concurrency=4),
                           api_key=None)
        try:
            return await asyncio.gather(*(
                client.complete(request_body(client.settings, messages(text=f"q{i}")))
                for i in range(12)))
        finally:
            await client.aclose()

    with FakeVLMServer(FakeVLMConfig(latency_ms=100)) as server:
        results = asyncio.run(go(server))
        assert server.stats()["max_in_flight"] == 4
    assert len(results) == 12
