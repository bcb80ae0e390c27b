"""Cached input tokens (issue 25): ``usage.prompt_tokens_details.cached_tokens`` read (hostile
values ignored or cut), priced at --price_per_million_cached_input_tokens in the budget and
summary.json, the image before the text so that the prompts of one image share a prefix, and
the fake server's prefix cache reporting them, end to end."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from conftest import SIZES, TEST_RUNNER, run_cli
from test_client import RED_PNG, messages

from beam_caption.core.client import (
    ClientSettings,
    Paid,
    VLMClient,
    read_completion,
    request_body,
    usage_counts,
)
from beam_caption.core.errors import CaptionError, JobStopped
from beam_caption.core.prompts import PromptSpec
from beam_caption.core.request import (
    DEFAULT_SYSTEM_PROMPT,
    PromptSettings,
    RequestPlan,
    build_messages,
    prompt_turns,
)
from beam_caption.core.summary import caption_counts, failure_counts, summary_from_counts
from beam_caption.testing import FakeVLMConfig, FakeVLMServer
from beam_caption.testing.fake_vlm import _config_from_args, _parse_args

RED_TOKENS = math.ceil(64 / 28) * math.ceil(32 / 28)  # the fake's tokens for RED_PNG (64x32)
SYSTEM = "You caption images."


def usage(cached, prompt=100) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": cached}}


@pytest.mark.parametrize("given, cached", [
    (usage(64), 64),
    (usage(64.0), 64),
    (usage(0), 0),
    (usage(500), 100),  # more than the prompt tokens: cut to them
    (usage("64"), None),
    (usage(-1), None),
    (usage(True), None),
    (usage(float("nan")), None),
    (usage(10**31), None),
    (usage([64]), None),
    ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": "64"}, None),
    ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": None}, None),
    ({"prompt_tokens": 100, "completion_tokens": 5}, None),
    (usage(64, prompt="100"), None),  # no usable prompt count: priced as the worst case
    (usage(64, prompt=None), None),
])
def test_cached_tokens_are_read_only_as_a_count_within_the_prompt_tokens(given, cached):
    counts = usage_counts(given)
    assert counts[3] == cached
    body = json.dumps({"choices": [{"message": {"content": "A cat."}, "finish_reason": "stop"}],
                       "usage": given}).encode()
    assert read_completion(body).cached_tokens == cached


def test_cached_tokens_are_priced_at_their_own_price_else_as_input():
    plain = ClientSettings(api_url="u", model="m", price_per_million_input_tokens=2.0,
                           price_per_million_output_tokens=8.0)
    assert plain.cost(1000, 100, cached_tokens=600) == pytest.approx(0.0028)
    priced = ClientSettings(api_url="u", model="m", price_per_million_input_tokens=2.0,
                            price_per_million_output_tokens=8.0,
                            price_per_million_cached_input_tokens=0.5)
    assert priced.cost(1000, 100, cached_tokens=600) == pytest.approx(
        (400 * 2.0 + 600 * 0.5 + 100 * 8.0) / 1e6)
    assert priced.cost(1000, 100, True, 600) == pytest.approx(
        (400 * 2.0 + 600 * 0.5 + 100 * 8.0) / 1e6 * 0.5)
    assert priced.cost(10, 0, cached_tokens=600) == pytest.approx(10 * 0.5 / 1e6)  # at most all


def test_paid_sums_cached_tokens_and_a_failure_shows_them():
    first = Paid(100, 5, None, False, 64)
    assert first.plus(Paid(100, 5)) == Paid(200, 10, None, False, 64)
    assert Paid(100, 5).plus(Paid(100, 5)).cached_tokens is None  # never reported
    assert first.as_dict() == {"prompt_tokens": 100, "completion_tokens": 5,
                               "cached_tokens": 64}
    assert Paid(100, 5, None, False, 0).as_dict() == {"prompt_tokens": 100,
                                                      "completion_tokens": 5}


def test_the_prompts_of_one_image_share_everything_up_to_its_end():
    settings = PromptSettings(system_prompt=SYSTEM)
    bodies = []
    for text in ("Describe the image.", "List the objects, as JSON."):
        plan = RequestPlan(("a.png",), prompt_turns({}, settings, PromptSpec(
            name=text, output_key=text, prompt=text)))
        bodies.append(build_messages(plan, [RED_PNG, RED_PNG], SYSTEM))
    first, second = bodies
    assert first[0] == second[0] == {"role": "system", "content": SYSTEM}
    assert first[1]["content"][:2] == second[1]["content"][:2] == [
        {"type": "image_url", "image_url": {"url": RED_PNG}}] * 2
    assert first[1]["content"][2:] != second[1]["content"][2:]  # the texts come last


def send_all(server, bodies, **settings) -> list:
    """Send ``bodies`` (messages) one after the other with one client: Completions, or the
    error that ended the sending."""
    async def go():
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm",
                                          initial_backoff=0.01, **settings), api_key="k", seed=0)
        results = []
        try:
            for msgs in bodies:
                try:
                    results.append(await client.complete(request_body(client.settings, msgs)))
                except (CaptionError, JobStopped) as error:
                    results.append(error)
        finally:
            await client.aclose()
        return results
    return asyncio.run(go())


def with_system(text) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, *messages(text)]


PREFIX_TOKENS = (4 + math.ceil(len(SYSTEM) / 4)) + (4 + RED_TOKENS)  # system, then the image


def test_the_second_prompt_of_an_image_is_served_from_the_fake_servers_prefix_cache():
    with FakeVLMServer(FakeVLMConfig()) as server:
        first, second, other = send_all(server, [with_system("Describe."),
                                                 with_system("List the objects."),
                                                 messages("Describe.")])
    assert first.cached_tokens is None  # nothing seen before: no prompt_tokens_details
    assert second.cached_tokens == PREFIX_TOKENS < second.prompt_tokens
    assert other.cached_tokens is None  # another prefix (no system prompt)
    with FakeVLMServer(FakeVLMConfig(prefix_cache_entries=0)) as server:
        assert [c.cached_tokens for c in send_all(server, [with_system("a"),
                                                           with_system("b")])] == [None, None]
    with FakeVLMServer(FakeVLMConfig(prefix_cache_entries=1)) as server:  # bounded: LRU
        results = send_all(server, [with_system("a"), messages("b"), with_system("c")])
    assert [c.cached_tokens for c in results] == [None, None, None]
    config = _config_from_args(_parse_args(["--prefix_cache_entries", "0"]))
    assert config.prefix_cache_entries == 0


def test_text_only_requests_are_never_served_from_the_prefix_cache():
    text_only = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi."}]
    with FakeVLMServer(FakeVLMConfig()) as server:
        assert [c.cached_tokens for c in send_all(server, [text_only, text_only])] == [None, None]


@pytest.mark.parametrize("hostile", [{"cached_tokens": "all"}, {"cached_tokens": -5},
                                     {"cached_tokens": 10**31}, "x", [1]])
def test_a_hostile_cached_count_is_ignored_and_priced_as_input(hostile):
    given = {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": hostile}
    with FakeVLMServer(FakeVLMConfig(usage=given)) as server:
        (result,) = send_all(server, [messages()])
    assert result.caption.startswith("A fake caption")
    assert (result.prompt_tokens, result.cached_tokens, result.usage_estimated) == (100, None,
                                                                                    False)


def test_the_budget_counts_cached_tokens_at_their_price():
    prices = {"price_per_million_input_tokens": 10.0, "price_per_million_output_tokens": 10.0}
    bodies = [with_system("Describe."), with_system("List the objects."), with_system("Tags?")]
    with FakeVLMServer(FakeVLMConfig()) as server:
        learned = send_all(server, bodies[:2])
    assert learned[1].cached_tokens == PREFIX_TOKENS
    cached_price = 1.0
    spent = sum(ClientSettings(api_url="u", model="m", **prices,
                               price_per_million_cached_input_tokens=cached_price).cost(
        c.prompt_tokens, c.completion_tokens, cached_tokens=c.cached_tokens or 0)
        for c in learned)
    budget = spent * 1.001  # the third request is sent only if the cached tokens were cheap
    with FakeVLMServer(FakeVLMConfig()) as server:
        cheap = send_all(server, bodies, max_cost=budget, **prices,
                         price_per_million_cached_input_tokens=cached_price)
    with FakeVLMServer(FakeVLMConfig()) as server:
        as_input = send_all(server, bodies, max_cost=budget, **prices)
    assert not isinstance(cheap[2], Exception) and cheap[2].cached_tokens == PREFIX_TOKENS
    assert isinstance(as_input[2], JobStopped) and "--max_cost" in str(as_input[2])


def test_a_failures_paid_block_holds_the_cached_tokens_of_its_retries():
    def refuse(text):
        raise CaptionError("response", "degenerate", "a loop", retryable=True)

    async def go(server):
        client = VLMClient(ClientSettings(api_url=server.url, model="fake-vlm", max_retries=2,
                                          initial_backoff=0.01), api_key="k", seed=0)
        try:
            await client.complete(request_body(client.settings, with_system("x")), check=refuse)
        finally:
            await client.aclose()

    with FakeVLMServer(FakeVLMConfig()) as server:
        with pytest.raises(CaptionError) as raised:
            asyncio.run(go(server))
    assert raised.value.attempts == 3
    # the retries ask again with a seed (a parameter): the same prefix, served from the cache
    assert raised.value.paid["cached_tokens"] == 2 * PREFIX_TOKENS


def caption_line(prompt, completion, cached, batch=False) -> dict:
    meta = {"prompt_tokens": prompt, "completion_tokens": completion, "attempts": 1,
            "cached": False, **({"cached_tokens": cached} if cached is not None else {})}
    return {"image": "a.png", "caption_meta": {**meta, **({"batch_id": "b"} if batch else {})}}


def summary_of(lines, failures=(), **options):
    counts: dict = {}
    for figures in [*(caption_counts(line, "image") for line in lines),
                    *(failure_counts(line) for line in failures)]:
        for name, value in figures.items():
            counts[name] = counts.get(name, 0) + value
    return summary_from_counts(counts, options)


def test_the_summary_shows_cached_tokens_their_share_and_their_price():
    lines = [caption_line(1000, 100, 600), caption_line(1000, 100, None)]
    failure = {"error": {"stage": "response", "type": "degenerate", "attempts": 3,
                         "paid": {"prompt_tokens": 2000, "completion_tokens": 300,
                                  "cached_tokens": 1400}}}
    prices = {"price_per_million_input_tokens": 2.0, "price_per_million_output_tokens": 8.0}
    summary = summary_of(lines, [failure], **prices, price_per_million_cached_input_tokens=0.5)
    assert summary["tokens"]["cached"] == 2000 and summary["tokens"]["prompt"] == 4000
    assert summary["cached_share"] == 0.5
    assert summary["cost"]["input"] == pytest.approx((2000 * 2.0 + 2000 * 0.5) / 1e6)
    assert summary["cost"]["total"] == pytest.approx(summary["cost"]["input"] + 500 * 8.0 / 1e6)
    as_input = summary_of(lines, [failure], **prices)  # no cached price: the input price
    assert as_input["cost"]["input"] == pytest.approx(4000 * 2.0 / 1e6)
    batch = summary_of([caption_line(1000, 0, 600, batch=True)], **prices,
                       price_per_million_cached_input_tokens=0.5, batch_discount=0.5)
    assert batch["cost"]["input"] == pytest.approx((400 * 2.0 + 600 * 0.5) / 1e6 * 0.5)
    assert summary_of([])["cached_share"] is None and summary_of([])["tokens"]["cached"] == 0


def prefix_tokens(width: int, height: int) -> int:
    """The fake's tokens of a request's prefix: the default system prompt, then one image."""
    return (4 + math.ceil(len(DEFAULT_SYSTEM_PROMPT) / 4)
            + 4 + math.ceil(width / 28) * math.ceil(height / 28))


def test_end_to_end_the_second_prompt_of_each_image_gets_cached_tokens(dataset_factory,
                                                                       tmp_path):
    data = dataset_factory(6, files=1)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(json.dumps({"caption": {"prompt": "Describe the image."},
                                   "short": {"prompt": "Describe it in five words."}}))
    prices = ["--price_per_million_input_tokens", "2", "--price_per_million_output_tokens", "8",
              "--price_per_million_cached_input_tokens", "0.5"]
    with FakeVLMServer(FakeVLMConfig()) as server:
        result = run_cli([*TEST_RUNNER, "--input", data.manifests[0], "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--prompts_file", str(prompts), *prices], tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.captions) == 6 and not result.failures
    expected = {f"r{i}": prefix_tokens(*SIZES[i % 3]) for i in range(6)}
    # both prompts go out at once: whichever comes second is served from the cache
    assert {c["id"]: c["caption_meta"]["cached_tokens"] for c in result.captions} == expected
    summary = result.summary
    assert summary["tokens"]["cached"] == sum(expected.values())
    assert summary["cached_share"] == round(sum(expected.values())
                                            / summary["tokens"]["prompt"], 4)
    assert summary["options"]["price_per_million_cached_input_tokens"] == 0.5
    uncached = summary["tokens"]["prompt"] - summary["tokens"]["cached"]
    assert summary["cost"]["input"] == pytest.approx(
        (uncached * 2 + summary["tokens"]["cached"] * 0.5) / 1e6, abs=1e-6)
