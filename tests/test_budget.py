"""--max_cost in a worker process: one CostBudget (core/budget.py) that every model's client
charges and asks, and the one stop line that says what each model and the reused captions
spent."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest
from conftest import runtime_config

from beam_caption.core.budget import CostBudget
from beam_caption.core.client import ClientSettings, VLMClient, request_body
from beam_caption.core.engine import CaptionRuntime
from beam_caption.core.errors import JobStopped
from beam_caption.core.prompts import parse_prompts
from beam_caption.core.request import PromptSettings
from beam_caption.testing import FakeVLMConfig, FakeVLMServer

# $0.01 an answer at $100 per million prompt tokens
FIXED_USAGE = {"prompt_tokens": 100, "completion_tokens": 0, "total_tokens": 100}


def test_a_budget_counts_each_model_and_the_reused_captions_against_its_limit():
    budget = CostBudget(0.05, worker_processes=2)
    budget.charge("small", 0.01)
    budget.charge("strong", 0.02)
    budget.charge("small", 0.005)
    assert budget.by_model == {"small": 0.015, "strong": 0.02}
    assert budget.spent == pytest.approx(0.035) and not budget.is_spent()
    budget.count_spent_before(0.04)  # the job's: this process's share is half
    assert budget.reused == 0.02 and budget.is_spent()
    budget.count_spent_before(0.0)  # set again: replaced
    assert budget.spent == pytest.approx(0.035) and not budget.is_spent()
    budget.charge("strong", 0.015)
    assert budget.is_spent()  # at the limit: nothing more is sent


def test_without_a_limit_a_budget_counts_but_is_never_spent():
    budget = CostBudget()
    budget.charge("m", 1e9)
    assert budget.spent == 1e9 and not budget.is_spent()


def test_the_stop_line_names_each_model_when_several_were_paid_and_the_reused_captions():
    one = CostBudget(0.05)
    one.charge("small", 0.06)
    line = str(one.stop())
    assert "--max_cost is spent (this worker process's share: $0.0500; spent $0.0600; " \
        "answers in flight" in line
    assert "of it by" not in line and "--resume with a higher --max_cost" in line
    two = CostBudget(0.05)
    two.charge("strong", 0.03)
    two.charge("small", 0.025)
    two.count_spent_before(0.01)
    assert "share: $0.0500; spent $0.0650, $0.0250 of it by small, $0.0300 of it by strong, " \
        "$0.0100 of it by the captions reused from earlier runs;" in str(two.stop())
    resumed = CostBudget(0.05)
    resumed.count_spent_before(0.07)
    assert "spent $0.0700, $0.0700 of it by the captions reused from earlier runs;" in \
        str(resumed.stop())


def _settings(server, model: str, **fields) -> ClientSettings:
    return ClientSettings(api_url=server.url, model=model, max_concurrency=1,
                          price_per_million_input_tokens=100, **fields)


async def _ask(client: VLMClient) -> None:
    await client.complete(request_body(client.settings,
                                       [{"role": "user", "content": "Describe."}]))


def test_clients_of_two_models_sharing_a_budget_stop_on_what_both_spent():
    """$0.015: neither model's $0.01 spends it, the two together do; each client alone (its own
    budget, the default) goes on."""
    with FakeVLMServer(FakeVLMConfig(models=("small", "strong"), usage=FIXED_USAGE)) as server:
        async def go(shared: CostBudget | None) -> JobStopped | None:
            small = VLMClient(_settings(server, "small", max_cost=0.015), None, budget=shared)
            strong = VLMClient(_settings(server, "strong", max_cost=0.015), None, budget=shared)
            try:
                await _ask(small)
                await _ask(strong)
                await _ask(small)
            except JobStopped as stop:
                return stop
            finally:
                await small.aclose()
                await strong.aclose()
            return None

        assert asyncio.run(go(None)) is None
        assert server.stats()["requests"] == 3
        server.reset_stats()
        stop = asyncio.run(go(CostBudget(0.015)))
        assert server.stats()["requests"] == 2  # the third was never sent
    assert stop is not None
    assert re.search(r"spent \$0\.0200, \$0\.0100 of it by small, \$0\.0100 of it by strong;",
                     str(stop)), stop


class _Recording:
    """A model client that records the budget it was given."""

    made: list[tuple[str, CostBudget]] = []

    def __init__(self, settings: ClientSettings, api_key: str | None, budget: CostBudget):
        self.made.append((settings.model, budget))

    async def aclose(self) -> None:
        pass


def test_the_runtime_gives_every_models_client_one_budget_and_what_earlier_runs_spent(
        tmp_path):
    factory = _Recording
    factory.made = []
    specs = parse_prompts({"caption": "Describe.",
                           "short": {"prompt": "Shorten: {caption}", "model": "small-vlm"}})
    config = runtime_config("http://127.0.0.1:9/v1", tmp_path, client_factory=factory)
    config = dataclasses.replace(
        config, client=dataclasses.replace(config.client, max_cost=1.0, worker_processes=4),
        prompts=PromptSettings(system_prompt=None, specs=tuple(specs)))
    runtime = CaptionRuntime(config)
    try:
        runtime.count_spent_before(2.0)
        runtime.call(asyncio.sleep(0))  # after the loop has counted it
    finally:
        runtime.close()
    assert [model for model, _ in factory.made] == ["fake-vlm", "small-vlm"]
    (_, first), (_, second) = factory.made
    assert first is second and first.limit == 1.0
    assert first.reused == 0.5  # this process's share of the job's $2
