"""The content-hash cache: duplicates are paid for once, answers are reused across runs."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import TEST_RUNNER, run_cli

from beam_caption.core.cache import RequestCache, request_digest
from beam_caption.core.client import ClientSettings, Completion, request_body
from beam_caption.core.errors import CaptionError
from beam_caption.testing import FakeVLMServer

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def completion(caption="A cat.") -> Completion:
    return Completion(caption, "stop", 10, 3, attempts=1, latency_ms=5.0)


async def run_in_thread(function, *args):
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def test_digest_changes_with_model_params_and_content():
    def digest(messages=MESSAGES, **settings):
        settings = {"api_url": "u", "model": "m", **settings}
        return request_digest(request_body(ClientSettings(**settings), messages))

    base = digest()
    assert base == digest(json.loads(json.dumps(MESSAGES)))
    assert base == digest(max_concurrency=3, request_timeout=5)  # not part of the request
    assert base != digest(model="m2")
    assert base != digest(temperature=0.5)
    assert base != digest([{"role": "user", "content": "other"}])


def test_concurrent_duplicates_are_sent_once():
    calls = []

    async def send():
        calls.append(1)
        await asyncio.sleep(0.05)
        return completion()

    async def go():
        cache = RequestCache(None, run_in_thread)
        first, second = await asyncio.gather(cache.complete("d", send), cache.complete("d", send))
        third = await cache.complete("d", send)
        return first, second, third

    first, second, third = asyncio.run(go())
    assert len(calls) == 1
    assert (first.cached, first.attempts) == (False, 1)
    assert (second.cached, second.attempts, second.caption) == (True, 0, "A cat.")
    assert third.cached


def test_failures_are_not_cached():
    outcomes = [CaptionError("request", "http_500", "boom", retryable=True), completion()]

    async def send():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def go():
        cache = RequestCache(None, run_in_thread)
        with pytest.raises(CaptionError):
            await cache.complete("d", send)
        return await cache.complete("d", send)

    assert asyncio.run(go()).cached is False and outcomes == []


@pytest.mark.parametrize("make_dir", [lambda tmp: str(tmp / "cache"),
                                      lambda tmp: f"memory://cache-test-{tmp.name}"])
def test_directory_cache_is_reused_by_a_new_worker(tmp_path, make_dir):
    cache_dir = make_dir(tmp_path)

    async def go(send):
        return await RequestCache(cache_dir, run_in_thread).complete("abcdef", send)

    async def paid():
        return completion("Stored.")

    async def must_not_send():
        raise AssertionError("the cache should have answered")

    assert asyncio.run(go(paid)).cached is False
    reused = asyncio.run(go(must_not_send))
    assert (reused.caption, reused.cached, reused.prompt_tokens) == ("Stored.", True, 10)


def test_duplicates_in_a_run_are_sent_once_and_cache_dir_serves_the_next_run(dataset_factory,
                                                                            tmp_path):
    data = dataset_factory(70, files=1)
    manifest = data.root / "manifest0.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    duplicates = [dict(records[i], id=f"dup{i}") for i in range(30)]  # 30 of 100 repeat
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records + duplicates))
    args = [*TEST_RUNNER, "--input", str(manifest), "--image_root", str(data.root),
            "--model", "fake-vlm", "--cache_dir", str(tmp_path / "cache")]
    with FakeVLMServer() as server:
        first = run_cli([*args, "--api_url", server.url], tmp_path / "out1")
        first_requests = server.stats()["requests"]
        server.reset_stats()
        second = run_cli([*args, "--api_url", server.url], tmp_path / "out2")
        second_requests = server.stats()["requests"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert first_requests == 70
    captions = {c["id"]: c["caption"] for c in first.captions}
    assert all(captions[f"dup{i}"] == captions[f"r{i}"] for i in range(30))
    summary = first.summary
    assert (summary["captioned"], summary["cache_hits"]) == (100, 30)
    assert summary["tokens_saved_by_cache"] > 0
    assert second.returncode == 0 and second_requests == 0
    assert second.summary["cache_hits"] == 100 and second.summary["tokens"]["total"] == 0
    assert all(c["caption_meta"]["cached"] for c in second.captions)


def test_a_cache_store_error_never_turns_a_paid_caption_into_a_failure(tmp_path, caplog):
    class BrokenStore:
        def get(self, digest):
            raise OSError("No space left on device")

        def put(self, digest, entry):
            raise OSError("No space left on device")

    calls = []

    async def send():
        calls.append(1)
        return completion()

    async def go():
        cache = RequestCache(None, run_in_thread)
        cache._store = BrokenStore()
        return await cache.complete("d", send)

    result = asyncio.run(go())
    assert result.caption == "A cat." and not result.cached and calls == [1]
    assert caplog.text.count("No space left on device") == 2
