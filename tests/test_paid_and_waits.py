"""Issue 22, online client: every wait a server asks for is bounded, every answer it bills is
counted (failed records, retries, answers without usage), and a budget stop keeps what it paid."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re

import pytest
from conftest import TEST_RUNNER, make_dataset, run_cli, runtime_config

from beam_caption.cli.main import main
from beam_caption.core.client import ClientSettings, Completion, worst_case_usage
from beam_caption.core.engine import CaptionRuntime
from beam_caption.core.errors import CaptionError, JobStopped
from beam_caption.core.ratelimit import (
    DEFAULT_MAX_SERVER_WAIT_S,
    JobRateLimiter,
    parse_duration,
    retry_after_seconds,
    server_wait,
)
from beam_caption.core.records import paid_by
from beam_caption.testing import FakeVLMConfig, FakeVLMServer

# $0.01 an answer: 100 prompt tokens at $100 per million, nothing for completions.
FIXED_USAGE = {"prompt_tokens": 100, "completion_tokens": 0, "total_tokens": 100}
PRICES = ["--price_per_million_input_tokens", "100", "--price_per_million_output_tokens", "0"]


def job_args(data, server, *extra, model="fake-vlm"):
    return [*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
            "--model", model, "--image_root", str(data.root), "--no_progress", *extra]


def elements(data):
    records = [json.loads(line) for path in data.manifests for line in open(path)]
    return [{"key": f"k{i}", "source": {"file": "f", "index": i}, "record": record}
            for i, record in enumerate(records)]


# -- one ceiling for every wait a server asks for ------------------------------------------------

@pytest.mark.parametrize("seconds, expected", [
    (None, None), (float("nan"), None), (-1.0, None), (float("inf"), None), (1e300, None),
    (DEFAULT_MAX_SERVER_WAIT_S + 1, None), (0.0, 0.0), (2.5, 2.5)])
def test_server_wait_takes_finite_waits_up_to_the_ceiling_only(seconds, expected):
    assert server_wait(seconds, "test", DEFAULT_MAX_SERVER_WAIT_S) == expected


def test_unusable_wait_headers_fall_back_to_the_default_with_a_debug_line(caplog):
    with caplog.at_level(logging.DEBUG, logger="beam_caption.core.ratelimit"):
        assert retry_after_seconds({"retry-after": "nan"}) is None
        assert retry_after_seconds({"retry-after": "-5"}) is None
        assert retry_after_seconds({"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"}) is None
        assert retry_after_seconds({"retry-after-ms": "inf", "retry-after": "2"}) == 2.0
        assert parse_duration("999999h") == 999999 * 3600.0  # parsed; server_wait refuses it
    assert sum("ignoring" in record.getMessage() for record in caplog.records) == 4


@pytest.mark.parametrize("headers", [
    {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "999999h"},
    {"x-ratelimit-limit-requests": "0.0000001", "x-ratelimit-remaining-requests": "0"},
    {"x-ratelimit-limit-tokens": "0.0000001", "x-ratelimit-remaining-tokens": "0",
     "x-ratelimit-reset-tokens": "nan"},
], ids=["reset_999999h", "limit_1e-7_requests", "limit_1e-7_tokens"])
def test_hostile_rate_limit_headers_do_not_stall_a_run(tmp_path, headers):
    data = make_dataset(tmp_path / "data", 6, files=1)
    with FakeVLMServer(FakeVLMConfig(answer_headers=headers)) as server:
        runtime = CaptionRuntime(runtime_config(server.url, data.root, max_concurrency=2))
        try:
            futures = [runtime.submit(element) for element in elements(data)]
            outcomes = [future.result(timeout=30) for future in futures]  # stalled: TimeoutError
        finally:
            runtime.close()
    assert [outcome.failure for outcome in outcomes] == [None] * 6


def test_the_limiter_waits_a_credible_account_reset():
    async def go():
        limiter = JobRateLimiter(max_wait=1.0)
        ticket, _ = await limiter.acquire(1)
        limiter.observe(ticket, {"x-ratelimit-remaining-requests": "0",
                                 "x-ratelimit-reset-requests": "300ms"})
        _, waited = await limiter.acquire(1)
        return waited

    assert 0.25 <= asyncio.run(go()) < 1.0


# -- every answer billed is counted --------------------------------------------------------------

def test_paid_answers_of_failed_records_count_in_tokens_cost_and_the_budget(
        dataset_factory, tmp_path, capsys):
    data = dataset_factory(6, files=1)
    reasoning = FakeVLMConfig(models=("gpt-5-nano",), reasoning=True, reasoning_ms_per_token=0)
    prices = ["--price_per_million_input_tokens", "1000", "--price_per_million_output_tokens",
              "1000"]
    with FakeVLMServer(reasoning) as server:
        assert main(job_args(data, server, "--max_tokens", "100", *prices, "--output",
                             str(tmp_path / "all"), model="gpt-5-nano")) == 0
        billed = server.stats()["requests"]
        server.reset_stats()
        stopped = main(job_args(data, server, "--max_tokens", "100", *prices, "--max_cost",
                                "0.5", "--max_concurrency", "1", "--output",
                                str(tmp_path / "budget"), model="gpt-5-nano"))
        billed_with_budget = server.stats()["requests"]
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    failures = [json.loads(line) for path in (tmp_path / "all").glob("failures-*")
                for line in path.read_text().splitlines()]
    assert billed == 6 and summary["failed"] == 6
    assert {failure["error"]["type"] for failure in failures} == {"length"}
    paid = [failure["error"]["paid"] for failure in failures]
    assert all(p["completion_tokens"] == 100 and p["prompt_tokens"] > 0 for p in paid)
    assert summary["tokens"]["completion"] == 600
    assert summary["tokens"]["total"] == sum(p["prompt_tokens"] + 100 for p in paid)
    assert math.isclose(summary["cost"]["total"], summary["tokens"]["total"] * 1000 / 1e6,
                        abs_tol=1e-6)
    # Each answer costs $0.1 for its completion and more for its prompt: $0.5 buys a few.
    assert stopped == 2 and 1 <= billed_with_budget < 6
    assert "--max_cost is spent" in capsys.readouterr().err


def test_schema_retries_count_in_the_caption_and_the_summary_as_in_the_budget(tmp_path):
    data = make_dataset(tmp_path / "data", 3, files=1)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"tags": {"prompt": "Tags?", "schema": {
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["tags"]}}}))
    out = tmp_path / "out"
    with FakeVLMServer(FakeVLMConfig(schema_break_first=1, usage=FIXED_USAGE)) as server:
        assert main(job_args(data, server, "--prompts_file", str(prompts), *PRICES,
                             "--output", str(out))) == 0
        billed = server.stats()["requests"]
    summary = json.loads((out / "summary.json").read_text())
    assert billed == 6 and summary["captioned"] == 3  # one broken answer each, then one good
    assert summary["tokens"]["prompt"] == 6 * 100 and summary["cost"]["total"] == 0.06


@pytest.mark.parametrize("answer", [
    {"omit_usage": True}, {"usage": {}}, {"usage": "lots"},
    {"usage": {"prompt_tokens": -5, "completion_tokens": -1}},
    {"usage": {"prompt_tokens": 10**31, "completion_tokens": "9"}},
], ids=["none", "empty", "string", "negative", "absurd"])
def test_answers_without_usable_usage_are_charged_a_worst_case_and_the_budget_holds(
        tmp_path, caplog, answer):
    data = make_dataset(tmp_path / "data", 20, files=1)
    worst = worst_case_usage(1000, {"max_completion_tokens": 50})
    assert worst == (950, 50)
    with FakeVLMServer(FakeVLMConfig(**answer)) as server, \
            caplog.at_level(logging.WARNING, logger="beam_caption.core.client"):
        # $1 a million tokens: each answer's worst case (~1,000 tokens) costs about $0.001.
        settings = ClientSettings(api_url=server.url, model="fake-vlm", max_concurrency=1,
                                  max_tokens=50, max_cost=0.004,
                                  price_per_million_input_tokens=1.0,
                                  price_per_million_output_tokens=1.0)
        runtime = CaptionRuntime(dataclasses.replace(
            runtime_config(server.url, data.root, max_concurrency=1), client=settings))
        outcomes, stopped = [], None
        try:
            for element in elements(data):
                try:
                    outcomes.append(runtime.submit(element).result(timeout=30))
                except JobStopped as stop:
                    stopped = stop
                    break
        finally:
            runtime.close()
        billed = server.stats()["requests"]
    assert stopped is not None and "--max_cost is spent" in str(stopped)
    assert 1 <= billed < 20 and len(outcomes) == billed
    metas = [outcome.caption["caption_meta"] for outcome in outcomes]
    assert all(meta["usage_estimated"] and meta["completion_tokens"] == 50 for meta in metas)
    warnings = [r for r in caplog.records if "no usable token counts" in r.getMessage()]
    assert len(warnings) == 1


# -- a budget stop keeps what it paid; --resume carries the budget over -----------------------

def _kept(out) -> int:
    checkpoint = out / ".checkpoint"
    return sum(1 for path in checkpoint.glob("*") for line in path.read_text().splitlines()
               if line.strip()) if checkpoint.exists() else 0


def test_a_budget_stop_keeps_every_paid_answer_and_resume_pays_each_record_once(tmp_path):
    data = make_dataset(tmp_path / "data", 60, files=1)
    out = tmp_path / "out"
    flags = ["--max_concurrency", "16", "--checkpoint_interval", "60", *PRICES]
    with FakeVLMServer(FakeVLMConfig(latency_ms=300, usage=FIXED_USAGE)) as server:
        stopped = run_cli(job_args(data, server, *flags, "--max_cost", "0.05"), out)
        billed = server.stats()["succeeded"]
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert "--max_cost is spent" in line and "Traceback" not in stopped.stderr
    # Every answer paid was kept (the 16 in flight when the budget ran out included), and the
    # stop line says what was really spent.
    assert 5 <= billed < 60 and _kept(out) == billed
    assert f"spent ${billed * 0.01:.4f}" in line, line
    # The same budget on --resume: the reused captions spent it already, nothing is sent.
    with FakeVLMServer(FakeVLMConfig(usage=FIXED_USAGE)) as server:
        again = run_cli(job_args(data, server, *flags, "--max_cost", "0.05", "--resume"), out)
        assert server.stats()["requests"] == 0
    assert again.returncode == 2 and "reused from earlier runs" in again.stderr
    assert re.search(r"spent \$0\.\d+, \$0\.\d+ of it by the captions reused", again.stderr)
    with FakeVLMServer(FakeVLMConfig(usage=FIXED_USAGE)) as server:
        resumed = run_cli(job_args(data, server, *flags, "--max_cost", "10", "--resume"), out)
        paid_again = server.stats()["succeeded"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.summary["captioned"] == 60 and resumed.summary["resumed"] == billed
    assert billed + paid_again == 60  # each record paid once in all
    assert resumed.summary["cost"]["total"] == pytest.approx(0.6)


def test_a_failed_record_of_several_prompts_carries_what_all_its_prompts_paid():
    kept = Completion("a caption", "stop", 40, 10, 1, 5.0)
    cached = Completion("from the cache", "stop", 40, 10, 0, 0.0, cached=True)
    cut = CaptionError("response", "length", "spent", paid={"prompt_tokens": 40,
                                                            "completion_tokens": 100})
    guessed = CaptionError("response", "schema", "bad", retryable=True,
                           paid={"prompt_tokens": 5, "completion_tokens": 7, "estimated": True})
    assert paid_by([kept, cached, cut]) == {"prompt_tokens": 80, "completion_tokens": 110}
    assert paid_by([cut, guessed]) == {"prompt_tokens": 45, "completion_tokens": 107,
                                       "estimated": True}
    assert paid_by([cached, CaptionError("image", "image_not_found", "gone")]) is None
    assert cut.to_dict()["paid"] == {"prompt_tokens": 40, "completion_tokens": 100}
