"""Memory and time stay bounded: the byte budget of records in flight, image read timeouts."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiohttp import web
from conftest import make_dataset, runtime_config

from beam_caption.core.engine import ByteBudget, CaptionRuntime
from beam_caption.core.errors import CaptionError
from beam_caption.core.http_images import UrlGuard
from beam_caption.core.images import read_image_bytes
from beam_caption.testing import FakeVLMServer


def test_byte_budget_waits_while_spent_and_lets_an_oversized_record_run_alone():
    async def go():
        budget = ByteBudget(100)
        order = []
        await budget.acquire(60)

        async def take(name, size):
            await budget.acquire(size)
            order.append(name)

        second = asyncio.create_task(take("second", 60))
        await asyncio.sleep(0.01)
        assert order == [] and budget.used == 60  # 120 would overspend: it waits
        await budget.resize(60, 30)  # the first record's bytes shrink (source -> body)
        await asyncio.sleep(0.01)
        assert order == ["second"] and budget.used == 90
        await budget.resize(30, 0)
        await budget.resize(60, 0)
        await second
        await take("huge", 1000)  # larger than the whole budget: runs once nothing else holds
        assert order == ["second", "huge"] and budget.used == 1000

    asyncio.run(go())


def test_byte_budget_serves_waiters_in_order_and_skips_a_cancelled_one():
    async def go():
        budget = ByteBudget(100)
        await budget.acquire(100)
        big = asyncio.create_task(budget.acquire(90))
        small = asyncio.create_task(budget.acquire(20))
        await asyncio.sleep(0.01)
        big.cancel()  # the first waiter gives up: the next one must not wait behind it
        await asyncio.sleep(0.01)
        await budget.resize(100, 50)
        await asyncio.wait_for(small, 1)
        assert budget.used == 70

    asyncio.run(go())


class _Peak:
    """Samples a runtime's budget from another thread while it works."""

    def __init__(self, runtime):
        self.runtime, self.peak, self._stop = runtime, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.runtime._budget.used)
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_bytes_in_flight_stay_within_the_budget_at_any_concurrency(tmp_path):
    data = make_dataset(tmp_path / "data", 40, files=1)
    images = sorted((data.root / "images").iterdir())
    largest = max(path.stat().st_size for path in images)
    budget = 4 * largest
    with FakeVLMServer() as server:
        config = runtime_config(server.url, data.root, max_concurrency=64,
                                max_bytes_in_flight=budget)
        runtime = CaptionRuntime(config)
        try:
            elements = [{"key": f"k{i}", "source": {"file": "f", "index": i},
                         "record": {"image": str(path), "conversation": [
                             {"from": "human", "value": f"q{i}"}]}}
                        for i, path in enumerate(images)]
            with _Peak(runtime) as peak:
                results = [future.result() for future in
                           [runtime.submit(element) for element in elements]]
        finally:
            runtime.close()
    assert all(outcome.failure is None for outcome in results)
    # Request bodies (base64 of the prepared image) are about 4/3 of a small source.
    assert 0 < peak.peak <= budget * 2
    assert runtime._budget.used == 0  # every record gave its bytes back


def test_an_image_url_that_never_answers_times_out(tmp_path):
    async def hang(request):
        await asyncio.sleep(30)
        return web.Response(body=b"")

    app = web.Application()
    app.router.add_get("/{name}", hang)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(CaptionError) as info:
            read_image_bytes(f"http://127.0.0.1:{port}/slow.png", 2**20, timeout=0.5,
                             guard=UrlGuard(allow_private=True))
        elapsed = time.monotonic() - started
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
    assert (info.value.stage, info.value.type, info.value.retryable) == \
        ("image", "image_timeout", True)
    assert elapsed < 5
