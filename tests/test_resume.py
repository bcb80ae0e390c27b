"""Resume: a killed run keeps its finished captions; the next run pays only for the rest."""

from __future__ import annotations

import collections
import glob
import os
import signal
import subprocess
import sys
import time

from beam_caption.testing import FakeVLMConfig, FakeVLMServer
from conftest import TEST_RUNNER, make_image, read_jsonl, run_cli


def args_for(data, server, *extra):
    return [*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
            "--model", "fake-vlm", "--image_root", str(data.root), *extra]


def checkpointed_keys(output) -> set[str]:
    return {c["caption_meta"]["key"] for c in read_jsonl(str(output / ".checkpoint" / "*.jsonl"))}


def test_output_with_earlier_results_needs_resume_or_overwrite(dataset_factory, tmp_path):
    data = dataset_factory(3, files=1)
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        assert run_cli(args_for(data, server), out).returncode == 0
        again = run_cli(args_for(data, server), out)
        assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
        assert len(again.captions) == 3  # nothing was touched
        server.reset_stats()
        overwritten = run_cli(args_for(data, server, "--overwrite", "--num_shards", "2"), out)
        assert overwritten.returncode == 0
        assert server.stats()["requests"] == 3
    assert len(overwritten.captions) == 3
    assert len(glob.glob(str(out / "captions-*"))) == 2  # the 1-shard files of run 1 are gone


def test_killed_run_resumes_without_losing_or_repeating_records(dataset_factory, tmp_path):
    data = dataset_factory(120, files=2)
    out = tmp_path / "out"
    with FakeVLMServer(FakeVLMConfig(latency_ms=100)) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "beam_caption", *args_for(data, server),
             "--max_concurrency", "4", "--checkpoint_interval", "0.2", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(checkpointed_keys(out)) < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        done_before = checkpointed_keys(out)
        assert 30 <= len(done_before) < 120
        assert not glob.glob(str(out / "captions-*"))  # the final files were never written

        server.reset_stats()
        resumed = run_cli(args_for(data, server, "--resume", "--max_concurrency", "16"), out)
        second_run_requests = server.stats()["requests"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = [c["id"] for c in resumed.captions]
    assert len(ids) == len(set(ids)) == 120, collections.Counter(ids).most_common(2)
    assert {c["id"]: c["caption"] for c in resumed.captions} == data.expected
    assert resumed.failures == []
    assert second_run_requests == 120 - len(done_before)
    assert resumed.summary["resumed"] == len(done_before)
    assert "kept from the earlier run" in resumed.stdout
    assert not os.path.exists(out / ".checkpoint")


def test_resume_retries_earlier_failures_and_keeps_captions(dataset_factory, tmp_path):
    data = dataset_factory(6, files=1)
    # A record whose image appears only after the first run.
    with open(data.manifests[0], "a") as handle:
        handle.write('{"id": "late", "image": "images/img00100.png", '
                     '"conversation": [{"from": "human", "value": "q"}]}\n')
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        first = run_cli(args_for(data, server, "--num_shards", "3"), out)
        assert [f["record"]["id"] for f in first.failures] == ["late"]
        _, late_caption = make_image(data.root, 100)
        server.reset_stats()
        second = run_cli(args_for(data, server, "--resume"), out)
        assert second.returncode == 0, second.stderr[-3000:]
        assert server.stats()["requests"] == 1
    assert second.failures == []
    captions = {c["id"]: c["caption"] for c in second.captions}
    assert captions == {**data.expected, "late": late_caption}
    assert len(second.captions) == 7
    # Only the new run's shard set is left: no stale shards of the 3-shard first run.
    assert len(glob.glob(str(out / "captions-*"))) == 1
    summary = second.summary
    assert (summary["records"], summary["captioned"], summary["resumed"]) == (7, 7, 6)
