"""Reasoning models end to end: the configuration of the pipeline this project replaces."""

from __future__ import annotations

from conftest import TEST_RUNNER, run_cli

from beam_caption.testing import FakeVLMConfig, FakeVLMServer


def test_a_reasoning_model_captions_reports_reasoning_and_fails_a_spent_limit_once(
        dataset_factory, tmp_path):
    data = dataset_factory(8, files=2)
    reasoning = FakeVLMConfig(models=("gpt-5-nano",), reasoning=True, reasoning_ms_per_token=0)

    def run(name, *flags):
        return run_cli([*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
                        "--model", "gpt-5-nano", "--image_root", str(data.root),
                        "--temperature", "0.2", *flags], tmp_path / name)

    with FakeVLMServer(reasoning) as server:
        fits = run("fits", "--max_tokens", "400")
        server.reset_stats()
        spent = run("spent", "--max_tokens", "100")
        spent_requests = server.stats()["requests"]
        minimal = run("minimal", "--max_tokens", "100", "--reasoning_effort", "minimal")
    for result in (fits, spent, minimal):
        assert result.returncode == 0, result.stderr[-3000:]
    # --temperature is refused by reasoning models: dropped once with a warning, no failure.
    assert "refuses temperature" in fits.stderr and fits.failures == []
    assert {r["id"]: r["caption"] for r in fits.captions} == data.expected
    assert all(r["caption_meta"]["reasoning_tokens"] == 192 for r in fits.captions)
    assert fits.summary["tokens"]["reasoning"] == 8 * 192
    # A limit spent on reasoning: one typed failure per record, at most two attempts each.
    assert spent.captions == [] and len(spent.failures) == 8
    assert {(f["error"]["stage"], f["error"]["type"]) for f in spent.failures} == \
        {("response", "length")}
    assert all(f["error"]["attempts"] <= 2 for f in spent.failures) and spent_requests <= 2 * 8
    assert "--max_tokens 100" in spent.failures[0]["error"]["message"]
    # Minimal effort fits where the default effort ran out of room.
    assert {r["id"]: r["caption"] for r in minimal.captions} == data.expected
