import asyncio
import base64
import io
import json
import random

import pytest
from PIL import Image

from beam_caption.core.client import (
    ClientSettings,
    HTTPStatusFailure,
    VLMClient,
    backoff_delay,
    parse_completion,
    request_body,
    retry_after_seconds,
)
from beam_caption.core.errors import CaptionError, JobStopped
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
    tuned = request_body(ClientSettings(api_url="u", model="m", max_tokens=64, temperature=0.0,
                                        reasoning_effort="low"), messages())
    assert json.loads(tuned) == {"model": "m", "messages": messages(),
                                 "max_completion_tokens": 64, "temperature": 0.0,
                                 "reasoning_effort": "low"}
    assert tuned.startswith(b'{"model":"m","max_completion_tokens":64,')  # parameters first


def completion_body(content="A cat.", finish="stop"):
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                    "finish_reason": finish}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 3}}).encode()


def test_parse_completion_reads_caption_and_usage():
    assert parse_completion(completion_body(" A cat. ")) == ("A cat.", "stop", 10, 3, None)


def test_no_text_after_a_spent_limit_or_a_refusal_is_a_permanent_typed_failure():
    spent = json.dumps({"choices": [{"message": {"content": ""}, "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 9, "completion_tokens": 100,
                                  "completion_tokens_details": {"reasoning_tokens": 100}}})
    with pytest.raises(CaptionError) as info:
        parse_completion(spent.encode(), max_tokens=100)
    assert (info.value.stage, info.value.type, info.value.retryable) == \
        ("response", "length", False)
    assert "--max_tokens 100" in info.value.message and "100 of them reasoning" in \
        info.value.message
    refused = json.dumps({"choices": [{"message": {"content": None, "refusal": "I can't."},
                                       "finish_reason": "stop"}]})
    with pytest.raises(CaptionError) as info:
        parse_completion(refused.encode())
    assert (info.value.type, info.value.retryable) == ("refusal", False)
    assert "I can't." in info.value.message


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
    error = info.value
    assert (error.stage, error.type, error.retryable) == ("response", error_type, True)


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


def test_a_retry_after_beyond_max_backoff_is_waited_as_asked_or_not_retried_early():
    settings = ClientSettings(api_url="u", model="m", max_backoff=8.0, max_retry_wait=120.0)
    rng = random.Random(1)
    assert backoff_delay(0, settings, 100.0, rng) == 100.0  # never earlier than asked
    assert backoff_delay(0, settings, 121.0, rng) is None  # past the ceiling: give up instead


def run_complete(server, msgs, api_key="k", **settings):
    async def go():
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm",
                                          initial_backoff=0.01, **settings), api_key=api_key,
                           seed=0)
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
    error = info.value
    assert (error.stage, error.type, error.retryable) == ("request", "content_policy", False)


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


def test_a_retry_after_past_max_retry_wait_fails_the_record_as_throttled():
    with FakeVLMServer(FakeVLMConfig(rate_429=1.0, retry_after=3600)) as server:
        with pytest.raises(CaptionError) as info:
            run_complete(server, messages(), max_retry_wait=60, max_backoff=0.1)
        assert server.stats()["requests"] == 1  # not retried after 0.1 s against a 1 h ask
    error = info.value
    assert (error.stage, error.type, error.retryable, error.attempts) == \
        ("request", "throttled", True, 1)
    assert "3600 s" in error.message and "--max_retry_wait" in error.message


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "12", "completion_tokens": 3.5},
    {"prompt_tokens": float("nan"), "completion_tokens": float("inf")},
    {"prompt_tokens": 10**31, "completion_tokens": -4},
    {"prompt_tokens": True, "completion_tokens": None},
])
def test_usage_counts_that_are_not_counts_are_charged_the_worst_case(usage):
    with FakeVLMServer(FakeVLMConfig(usage=usage)) as server:
        result = run_complete(server, messages())
    assert result.caption.startswith("A fake caption")
    # No estimate given (tokens=0): the worst case is the longest answer allowed.
    assert (result.prompt_tokens, result.completion_tokens) == (0, 256)
    assert result.usage_estimated


def test_integral_float_counts_are_kept():
    with FakeVLMServer(FakeVLMConfig(usage={"prompt_tokens": 12.0, "completion_tokens": 3})) as s:
        result = run_complete(s, messages())
    assert (result.prompt_tokens, result.completion_tokens) == (12, 3)


def test_a_lone_surrogate_in_a_caption_becomes_a_replacement_character():
    with FakeVLMServer(FakeVLMConfig(caption_suffix="\ud800!")) as server:
        result = run_complete(server, messages())
    assert result.caption.endswith("\ufffd!")
    result.caption.encode("utf-8")  # encodable: Beam's coder and the output files need it


def test_an_endless_body_is_cut_at_max_response_bytes():
    with FakeVLMServer(FakeVLMConfig(endless_body=True)) as server:
        with pytest.raises(CaptionError) as info:
            run_complete(server, messages(), max_response_bytes=2**20, max_retries=3)
        assert server.stats()["requests"] == 1  # a body that never ends is not asked for again
    assert (info.value.stage, info.value.type, info.value.retryable) == \
        ("response", "response_too_large", False)


def test_a_caption_over_max_caption_chars_is_a_permanent_failure():
    with FakeVLMServer(FakeVLMConfig(caption_chars=10 * 2**20)) as server:
        with pytest.raises(CaptionError) as info:
            run_complete(server, messages(), max_response_bytes=32 * 2**20)
        assert server.stats()["requests"] == 1
    assert (info.value.type, info.value.retryable) == ("caption_too_long", False)
    assert "32000" in info.value.message


def test_the_key_is_scrubbed_from_messages_and_captions():
    key = "sk-test-0123456789"
    echo = FakeVLMConfig(api_key="other-key", echo_auth=True)
    with FakeVLMServer(echo) as server:
        with pytest.raises(CaptionError) as info:
            run_complete(server, messages(), api_key=key)
    assert info.value.type == "http_401" and key not in str(info.value)
    assert "Bearer [REDACTED]" in info.value.message
    with FakeVLMServer(FakeVLMConfig(caption_suffix=f" key={key} Bearer {key}")) as server:
        result = run_complete(server, messages(), api_key=key)
    assert key not in result.caption and result.caption.endswith("Bearer [REDACTED]")


@pytest.mark.parametrize("status", [401, 403, 404])
def test_consecutive_refusals_stop_the_client(status):
    async def go(server):
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm",
                                          max_concurrency=1, stop_after_refusals=3), api_key="k")
        outcomes = []
        try:
            for i in range(8):
                try:
                    await client.complete(request_body(client.settings, messages(text=f"q{i}")))
                    outcomes.append("ok")
                except (CaptionError, JobStopped) as exc:
                    outcomes.append(type(exc).__name__)
        finally:
            await client.aclose()
        return outcomes

    with FakeVLMServer(FakeVLMConfig(refuse_after=2, refuse_status=status)) as server:
        outcomes = asyncio.run(go(server))
        requests = server.stats()["requests"]
    assert outcomes == ["ok", "ok", "CaptionError", "CaptionError", *["JobStopped"] * 4]
    assert requests == 5  # nothing is sent once stopped


def test_one_refusal_among_successes_does_not_stop_the_client():
    client_settings = ClientSettings(api_url="u", model="m", stop_after_refusals=2)
    client = VLMClient.__new__(VLMClient)
    client.settings, client._refusals, client._stopped = client_settings, 0, None
    client._stop_event = asyncio.Event()
    failure = HTTPStatusFailure(401, {}, b"{}")
    error = CaptionError("request", "http_401", "no")
    client._count_refusal(failure, error)
    client._count_refusal(None, CaptionError("request", "timeout", "slow"))  # resets the run
    client._count_refusal(failure, error)
    assert client._stopped is None
    with pytest.raises(JobStopped):
        client._count_refusal(failure, error)


def test_reasoning_model_captions_with_max_completion_tokens_and_reports_reasoning():
    with FakeVLMServer(FakeVLMConfig(reasoning=True, reasoning_ms_per_token=0)) as server:
        result = run_complete(server, messages(), max_tokens=400)
    assert result.attempts == 1 and result.reasoning_tokens == 192
    assert result.caption.startswith("A fake caption")


def test_a_limit_spent_on_reasoning_fails_once_and_minimal_effort_fits():
    with FakeVLMServer(FakeVLMConfig(reasoning=True, reasoning_ms_per_token=0)) as server:
        with pytest.raises(CaptionError) as info:
            run_complete(server, messages(), max_tokens=100)
        assert server.stats()["requests"] == 1  # a spent limit is not paid for again
        result = run_complete(server, messages(), max_tokens=100, reasoning_effort="minimal")
    assert (info.value.type, info.value.attempts) == ("length", 1)
    assert result.caption.startswith("A fake caption") and result.reasoning_tokens == 0


def run_several(server, count, **settings):
    async def go():
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm", **settings),
                           api_key="k")
        try:
            return [await client.complete(request_body(client.settings, messages(text=f"q{i}")))
                    for i in range(count)]
        finally:
            await client.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("config, settings", [
    (FakeVLMConfig(reasoning=True, reasoning_ms_per_token=0), {"temperature": 0.2}),
    (FakeVLMConfig(legacy_params=True), {"max_tokens": 400}),
    (FakeVLMConfig(), {"reasoning_effort": "low"}),
], ids=["reasoning_model_refuses_temperature", "old_server_refuses_max_completion_tokens",
        "chat_model_refuses_reasoning_effort"])
def test_a_refused_parameter_is_respelled_or_dropped_once_for_the_run(config, settings, caplog):
    with FakeVLMServer(config) as server:
        results = run_several(server, 3, **settings)
        requests = server.stats()["requests"]
    assert [r.attempts for r in results] == [2, 1, 1]  # learned once, remembered
    assert requests == 4
    assert len([r for r in caplog.records if "refuses" in r.getMessage()]) == 1


def test_requests_in_flight_when_a_parameter_is_refused_are_sent_again_not_failed(caplog):
    async def go(server):
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm", temperature=0.2),
                           api_key="k")
        try:
            return await asyncio.gather(*(
                client.complete(request_body(client.settings, messages(text=f"q{i}")))
                for i in range(8)))
        finally:
            await client.aclose()

    config = FakeVLMConfig(reasoning=True, reasoning_ms_per_token=0, latency_ms=50)
    with FakeVLMServer(config) as server:
        results = asyncio.run(go(server))
    assert all(1 <= r.attempts <= 2 for r in results)
    assert len([r for r in caplog.records if "refuses" in r.getMessage()]) == 1


def test_a_refused_response_format_fails_its_request_and_is_kept_for_the_others():
    """A 400 naming response_format is a bad schema of one prompt, not a server without the
    parameter: structured output must not be switched off for every prompt."""
    bad = {"response_format": {"type": "xml"}}
    good = {"response_format": {"type": "json_object"}}

    async def go():
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm",
                                          initial_backoff=0.01), api_key=None, seed=0)
        try:
            with pytest.raises(CaptionError) as refused:
                await client.complete(request_body(client.settings, messages(), bad), 0, bad)
            answer = await client.complete(request_body(client.settings, messages(), good), 0,
                                           good, json.loads)
            return refused.value, answer
        finally:
            await client.aclose()

    with FakeVLMServer(FakeVLMConfig()) as server:
        refused, answer = asyncio.run(go())
        requests = server.stats()["requests"]
    assert (refused.type, refused.attempts) == ("http_400", 1)
    assert answer.caption == {"caption": "A fake caption: landscape image, colour #ff0000"}
    assert requests == 2
