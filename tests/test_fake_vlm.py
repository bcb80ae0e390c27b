"""Tests for the fake OpenAI-compatible VLM server (talked to with urllib, like any HTTP client)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image, ImageOps

from beam_caption.testing import (
    FakeVLMConfig,
    FakeVLMServer,
    caption_for_images,
    describe_image,
    spawn_fake_vlm,
)

SYSTEM = "You are an image caption generator."
PROMPT = "Describe this image."


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(*urls: str, prompt: str = PROMPT, model: str = "fake-vlm", **extra) -> dict:
    parts = [{"type": "text", "text": prompt}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": model, "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": parts}], **extra}


def post(url: str, body: object, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """POST JSON (or raw bytes) and return (status, headers, body) for any status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def chat(server: FakeVLMServer, body: object, headers: dict | None = None):
    return post(server.url + "/chat/completions", body, headers)


def error_code(raw: bytes) -> str | None:
    return json.loads(raw)["error"]["code"]


RED = Image.new("RGB", (64, 32), (255, 0, 0))


@pytest.fixture(scope="module")
def server():
    with FakeVLMServer() as srv:
        yield srv


def test_valid_request_returns_caption_and_usage(server):
    status, _, raw = chat(server, chat_body(data_url(RED), max_tokens=100, temperature=0.2))
    assert status == 200
    answer = json.loads(raw)
    caption = "A fake caption: landscape image, colour #ff0000"
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["model"] == "fake-vlm"
    assert answer["choices"] == [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": caption,
                                              "refusal": None}}]
    image_tokens = math.ceil(64 / 28) * math.ceil(32 / 28)
    prompt_tokens = ((4 + math.ceil(len(SYSTEM) / 4))
                     + (4 + math.ceil(len(PROMPT) / 4) + image_tokens))
    assert answer["usage"] == {"prompt_tokens": prompt_tokens,
                               "completion_tokens": math.ceil(len(caption) / 4),
                               "total_tokens": prompt_tokens + math.ceil(len(caption) / 4)}
    assert caption_for_images([RED]) == caption


def test_caption_survives_client_preprocessing(server, tmp_path):
    """EXIF rotation, resize, RGB conversion and JPEG re-encoding keep the caption."""
    original = Image.new("RGB", (300, 200), (200, 100, 30))
    original.paste((190, 110, 20), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored landscape, displayed portrait
    path = tmp_path / "rotated.jpg"
    original.save(path, exif=exif, quality=95)

    expected = caption_for_images([Image.open(path)])
    assert expected == "A fake caption: portrait image, colour #cc6633"
    sent = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    sent.thumbnail((90, 90))
    _, _, raw = chat(server, chat_body(data_url(sent, "JPEG")))
    assert json.loads(raw)["choices"][0]["message"]["content"] == expected


def test_several_images_and_transparency(server):
    clear = Image.new("RGBA", (20, 40), (0, 0, 0, 0))
    assert describe_image(clear) == "portrait image, colour #ffffff"
    status, _, raw = chat(server, chat_body(data_url(RED), data_url(clear)))
    assert status == 200
    assert json.loads(raw)["choices"][0]["message"]["content"] == (
        "A fake caption: landscape image, colour #ff0000; portrait image, colour #ffffff")


def test_no_image_and_max_tokens_truncation(server):
    _, _, raw = chat(server, chat_body())
    assert json.loads(raw)["choices"][0]["message"]["content"] == "A fake caption: no image"
    _, _, raw = chat(server, chat_body(data_url(RED), max_completion_tokens=2))
    answer = json.loads(raw)
    assert answer["choices"][0]["message"]["content"] == "A fake c"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2


def test_unknown_model_is_404(server):
    status, _, raw = chat(server, chat_body(data_url(RED), model="gpt-nope"))
    assert status == 404 and error_code(raw) == "model_not_found"


@pytest.mark.parametrize("body", [
    b"{not json",
    [1, 2],
    {"messages": [{"role": "user", "content": "hi"}]},
    {"model": "fake-vlm", "messages": []},
    {"model": "fake-vlm", "messages": [{"role": "system", "content": "only system"}]},
    {"model": "fake-vlm", "messages": [{"role": "robot", "content": "hi"}]},
    {"model": "fake-vlm", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
    {"model": "fake-vlm", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    {"model": "fake-vlm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
], ids=["not-json", "not-object", "no-model", "no-messages", "no-user", "bad-role", "bad-part",
        "stream", "max-tokens"])
def test_invalid_requests_are_400(server, body):
    status, _, raw = chat(server, body)
    assert status == 400
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_bad_image_is_400_invalid_image(server):
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    status, _, raw = chat(server, chat_body(garbage))
    assert status == 400 and error_code(raw) == "invalid_image"


def test_http_image_url_is_rejected(server):
    status, _, raw = chat(server, chat_body("http://127.0.0.1/cat.png"))
    assert status == 400 and error_code(raw) == "invalid_image_url"


def test_reject_marker_is_content_policy_violation(server):
    status, _, raw = chat(server, chat_body(data_url(RED), prompt="please REJECT_400 this"))
    assert status == 400 and error_code(raw) == "content_policy_violation"


def test_api_key_required_when_set():
    with FakeVLMServer(FakeVLMConfig(api_key="sekret")) as srv:
        status, _, raw = chat(srv, chat_body(data_url(RED)))
        assert status == 401 and error_code(raw) == "invalid_api_key"
        status, _, _ = chat(srv, chat_body(data_url(RED)), {"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, _ = chat(srv, chat_body(data_url(RED)), {"Authorization": "Bearer sekret"})
        assert status == 200
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(srv.url + "/models", timeout=10)
        excinfo.value.close()
        assert excinfo.value.code == 401


def test_fail_first_fails_each_content_n_times():
    with FakeVLMServer(FakeVLMConfig(fail_first=2)) as srv:
        statuses = [chat(srv, chat_body(data_url(RED)))[0] for _ in range(3)]
        assert statuses == [503, 503, 200]
        other = chat_body(data_url(RED), prompt="another record")
        assert [chat(srv, other)[0] for _ in range(3)] == [503, 503, 200]
        stats = srv.stats()
        assert stats["faults"] == {"fail_first": 4}
        assert stats["by_status"] == {"503": 4, "200": 2}


def test_rate_429_sends_retry_after_headers():
    config = FakeVLMConfig(rate_429=1, retry_after=2, retry_after_ms=1500)
    with FakeVLMServer(config) as srv:
        status, headers, raw = chat(srv, chat_body(data_url(RED)))
    assert status == 429 and error_code(raw) == "rate_limit_exceeded"
    assert headers["Retry-After"] == "2" and headers["retry-after-ms"] == "1500"


def test_rate_500_picks_a_5xx():
    with FakeVLMServer(FakeVLMConfig(rate_500=1)) as srv:
        statuses = {chat(srv, chat_body(data_url(RED)))[0] for _ in range(12)}
    assert statuses <= {500, 502, 503} and statuses


def test_rate_reset_drops_the_connection():
    with FakeVLMServer(FakeVLMConfig(rate_reset=1)) as srv:
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            chat(srv, chat_body(data_url(RED)))
        assert srv.stats()["faults"] == {"reset": 1}


@pytest.mark.parametrize("fault, content_type", [
    ("malformed", "application/json"), ("empty", "application/json"), ("html", "text/html")])
def test_bad_200_bodies(fault, content_type):
    with FakeVLMServer(FakeVLMConfig(**{f"rate_{fault}": 1})) as srv:
        status, headers, raw = chat(srv, chat_body(data_url(RED)))
    assert status == 200 and headers["Content-Type"].startswith(content_type)
    with pytest.raises(ValueError):
        json.loads(raw)


def test_stats_track_concurrency_and_captions():
    n = 8
    with FakeVLMServer(FakeVLMConfig(latency_ms=200)) as srv:
        threads = [threading.Thread(target=chat, args=(srv, chat_body(data_url(RED))))
                   for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with urllib.request.urlopen(srv.url.removesuffix("/v1") + "/stats", timeout=10) as resp:
            stats = json.loads(resp.read())
        assert stats == srv.stats()
        assert stats["max_in_flight"] == n and stats["in_flight"] == 0
        assert stats["requests"] == stats["succeeded"] == stats["images"] == n
        assert stats["by_caption"] == {"A fake caption: landscape image, colour #ff0000": n}
        post(srv.url.removesuffix("/v1") + "/stats/reset", {})
        assert srv.stats()["requests"] == 0 and srv.stats()["max_in_flight"] == 0


def test_spawn_fake_vlm_serves_until_terminated():
    process, url = spawn_fake_vlm(["--model", "m1", "--model", "m2", "--latency_ms", "1"])
    try:
        with urllib.request.urlopen(url + "/models", timeout=10) as response:
            models = [m["id"] for m in json.loads(response.read())["data"]]
        assert models == ["m1", "m2"]
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_non_loopback_host_is_refused():
    for host in ("0.0.0.0", "192.168.1.10", "example.com"):
        with pytest.raises(ValueError):
            FakeVLMServer(host=host)


def test_reasoning_models_follow_openais_rules():
    caption = "A fake caption: landscape image, colour #ff0000"
    with FakeVLMServer(FakeVLMConfig(reasoning=True, reasoning_ms_per_token=0)) as srv:
        status, _, raw = chat(srv, chat_body(data_url(RED), max_tokens=400))
        assert status == 400 and json.loads(raw)["error"]["param"] == "max_tokens"
        status, _, raw = chat(srv, chat_body(data_url(RED), temperature=0.2))
        assert status == 400 and json.loads(raw)["error"]["param"] == "temperature"
        status, _, raw = chat(srv, chat_body(data_url(RED), max_completion_tokens=400))
        answer = json.loads(raw)
        assert answer["choices"][0]["message"]["content"] == caption
        text_tokens = math.ceil(len(caption) / 4)
        assert answer["usage"]["completion_tokens"] == 192 + text_tokens
        assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 192}
        # The default effort's reasoning uses up a small limit: no text, finish_reason length.
        status, _, raw = chat(srv, chat_body(data_url(RED), max_completion_tokens=100))
        choice = json.loads(raw)["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("", "length")
        status, _, raw = chat(srv, chat_body(data_url(RED), max_completion_tokens=100,
                                             reasoning_effort="minimal"))
        assert json.loads(raw)["choices"][0]["message"]["content"] == caption


def test_legacy_servers_and_chat_models_refuse_newer_parameters(server):
    with FakeVLMServer(FakeVLMConfig(legacy_params=True)) as srv:
        status, _, raw = chat(srv, chat_body(data_url(RED), max_completion_tokens=10))
        assert status == 400 and "max_completion_tokens" in json.loads(raw)["error"]["message"]
    status, _, raw = chat(server, chat_body(data_url(RED), reasoning_effort="low"))
    assert status == 400 and "reasoning_effort" in json.loads(raw)["error"]["message"]


def test_refusal_marker_gets_a_refusal(server):
    status, _, raw = chat(server, chat_body(data_url(RED), prompt="REFUSE_ME please"))
    message = json.loads(raw)["choices"][0]["message"]
    assert status == 200 and message["content"] is None and message["refusal"]
