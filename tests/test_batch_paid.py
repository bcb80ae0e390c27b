"""Batch mode counts every answer it was billed once: answers refused after they came (a
length-cut reasoning answer) count in the failure's ``error.paid`` and the summary at the batch
price, and an answer shared by identical records counts once."""

from __future__ import annotations

import json

from conftest import RunResult
from test_batch import BATCH, job_flags

from beam_caption.cli.main import main
from beam_caption.testing import FakeVLMConfig, FakeVLMServer

PRICES = ["--price_per_million_input_tokens", "1000", "--price_per_million_output_tokens", "1000"]


def run_batch(capsys, server, data, out, *flags: str) -> RunResult:
    code = main([*job_flags(server, data), *BATCH, *PRICES, *flags, "--output", str(out)])
    captured = capsys.readouterr()
    return RunResult(code, captured.out, captured.err, out)


def test_length_cut_batch_answers_are_paid_in_failures_and_the_summary(
        capsys, dataset_factory, tmp_path):
    data = dataset_factory(3, files=1)
    reasoning = FakeVLMConfig(models=("fake-vlm",), reasoning=True, reasoning_ms_per_token=0)
    with FakeVLMServer(reasoning) as server:
        run = run_batch(capsys, server, data, tmp_path / "out", "--max_tokens", "100")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.captions == [] and len(run.failures) == 3
    paid = [f["error"]["paid"] for f in run.failures]
    assert {f["error"]["type"] for f in run.failures} == {"length"}
    assert all(p["batch"] and p["completion_tokens"] == 100 and p["prompt_tokens"] > 0
               for p in paid)
    tokens = run.summary["tokens"]
    assert tokens["completion"] == 300
    assert tokens["total"] == sum(p["prompt_tokens"] + p["completion_tokens"] for p in paid)
    assert run.summary["cost"]["total"] == round(tokens["total"] * 1000 / 1e6 * 0.5, 6)


def test_an_answer_shared_by_identical_records_counts_once(capsys, dataset_factory, tmp_path):
    data = dataset_factory(2, files=1)
    manifest = data.manifests[0]
    lines = open(manifest).read().splitlines()
    open(manifest, "w").write("\n".join([lines[0], lines[0], lines[1]]) + "\n")
    with FakeVLMServer() as server:
        run = run_batch(capsys, server, data, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    first = json.loads(lines[0])["id"]
    twins = [c["caption_meta"] for c in run.captions if c["id"] == first]
    other = next(c["caption_meta"] for c in run.captions if c["id"] != first)
    assert sorted(meta["cached"] for meta in twins) == [False, True]
    assert sorted(meta["attempts"] for meta in twins) == [0, 1]
    paid_once = sum(m["prompt_tokens"] + m["completion_tokens"] for m in (twins[0], other))
    assert run.summary["tokens"]["total"] == paid_once
    assert run.summary["cache_hits"] == 1
    assert run.summary["cost"]["total"] == round(paid_once * 1000 / 1e6 * 0.5, 6)
