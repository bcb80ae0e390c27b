"""Job-wide rate limits: the token estimate, header parsing, pacing, and a fleet of two worker
processes against a server that enforces an account limit."""

import asyncio
import time

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption.cli.flags import CaptionOptions, count_worker_processes, prepare_launch
from beam_caption.core.errors import UsageError
from beam_caption.core.ratelimit import AccountState, JobRateLimiter, parse_duration
from beam_caption.testing.fake_vlm import FakeVLMConfig, FakeVLMServer
from tests.conftest import run_cli


@pytest.mark.parametrize("text, seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
    ("", None), ("soon", None), ("1s2x", None), ("-1", None), ("nan", None), (None, None),
])
def test_reset_durations_are_parsed_or_refused(text, seconds):
    assert parse_duration(text) == seconds


def test_account_state_from_headers():
    state = AccountState.from_headers({"x-ratelimit-limit-tokens": "30000",
                                       "x-ratelimit-remaining-tokens": "29000",
                                       "x-ratelimit-reset-tokens": "2s"}, "tokens")
    assert state == AccountState(30000, 29000, 2.0)
    assert AccountState.from_headers({"x-ratelimit-remaining-requests": "many"},
                                     "requests") is None


def _start_times(limiter: JobRateLimiter, n: int, tokens: int = 1) -> list[float]:
    async def run():
        started = time.monotonic()
        times = []
        for _ in range(n):
            ticket, _ = await limiter.acquire(tokens)
            limiter.observe(ticket, None)  # answered, without headers
            times.append(time.monotonic() - started)
        return times
    return asyncio.run(run())


def test_the_job_limit_is_split_over_worker_processes():
    # 1200 per minute for the job, 4 processes: 300 per minute (one per 0.2 s) for this one.
    times = _start_times(JobRateLimiter(requests_per_minute=1200, worker_processes=4), 6)
    assert times[0] < 0.05
    assert 5 * 0.2 * 0.95 <= times[-1] < 5 * 0.2 + 0.3


def test_tokens_per_minute_paces_by_estimated_tokens():
    # 60,000 tokens per minute = 1,000 per second, and a second's worth at once: the first
    # 1,000-token request goes at once, the next ones a second apart.
    times = _start_times(JobRateLimiter(tokens_per_minute=60_000), 4, tokens=1000)
    assert times[0] < 0.05
    assert 3 * 0.95 <= times[-1] < 3 + 0.3


def test_a_low_account_holds_requests_until_the_refill_covers_them():
    limiter = JobRateLimiter()
    ticket, waited = asyncio.run(limiter.acquire(10))
    assert waited == 0  # nothing known yet: no wait
    # The account has 0 requests left, refilled at 600 per minute: one more in 0.1 s.
    limiter.observe(ticket, {"x-ratelimit-limit-requests": "600",
                             "x-ratelimit-remaining-requests": "0"})
    times = _start_times(limiter, 3)
    assert times[0] >= 0.1 and times[-1] < 0.3 * 1.25 + 0.1


def test_limits_need_a_known_number_of_worker_processes():
    def launch(*flags):
        options = PipelineOptions(list(flags)).view_as(CaptionOptions)
        prepare_launch(options)
        return options.worker_processes

    assert launch("--max_requests_per_minute", "60") == 1
    assert launch("--max_tokens_per_minute", "6000", "--direct_running_mode",
                  "multi_processing", "--direct_num_workers", "3") == 3
    assert launch("--runner", "PortableRunner") is None  # no limit: nothing to split
    assert launch("--runner", "PortableRunner", "--max_requests_per_minute", "60",
                  "--worker_processes", "8") == 8
    with pytest.raises(UsageError, match="--worker_processes"):
        launch("--runner", "FlinkRunner", "--max_requests_per_minute", "60")
    dataflow = PipelineOptions(["--runner", "DataflowRunner", "--max_num_workers", "20",
                                "--worker_machine_type", "n2-standard-4"])
    assert count_worker_processes(dataflow) == 80


def _fleet_args(data, server, *extra):
    return ["--runner", "FnApiRunner", "--direct_running_mode", "multi_processing",
            "--direct_num_workers", "2", "--input", ",".join(data.manifests),
            "--api_url", server.url, "--model", "fake-vlm", "--image_root", str(data.root),
            "--max_concurrency", "8", "--max_retries", "20", *extra]


@pytest.mark.parametrize("headers, flags", [
    (True, ()),  # the account's headers alone pace the fleet
    (False, ("--max_requests_per_minute", "600")),  # no headers: the job's figure, split
])
def test_two_worker_processes_keep_within_an_account_limit(dataset_factory, tmp_path, headers,
                                                           flags):
    data = dataset_factory(40, files=2)
    # 600 requests per minute with a 2-second bucket: 20 at once, then one per 0.1 s, enforced
    # with 429s. Unpaced, 2 processes x 8 in flight at 20 ms each would ask ~40x that.
    config = FakeVLMConfig(latency_ms=20, account_rpm=600, account_burst_s=2.0,
                           account_headers=headers, retry_after=0.5)
    with FakeVLMServer(config) as server:
        started = time.monotonic()
        result = run_cli(_fleet_args(data, server, *flags), tmp_path / "out")
        stats = server.stats()
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r["id"] for r in result.captions) == sorted(data.expected)
    refused = stats["by_status"].get("429", 0)
    assert refused <= 0.1 * stats["requests"], stats  # almost none refused
    assert time.monotonic() - started >= (40 - 20) / 10  # and no faster than the account allows
    assert result.summary["throttled_s"] > 0  # time held back is reported
