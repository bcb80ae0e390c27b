"""The real CLI (its main, run in this process) against the fake VLM server on 127.0.0.1."""

from __future__ import annotations

import collections
import glob
import os
import subprocess
import sys

import pytest
from conftest import TEST_RUNNER, run_cli, run_cli_process

from beam_caption.testing import FakeVLMConfig, FakeVLMServer

API_KEY = "sk-test-SECRET-4f9a7c"


def check_every_record_once(result, data):
    captions = {r["id"]: r for r in result.captions}
    failures = {f["record"]["id"]: f for f in result.failures}
    ids = [r["id"] for r in result.captions] + [f["record"]["id"] for f in result.failures]
    assert len(ids) == len(set(ids)) == data.total, collections.Counter(ids).most_common(3)
    for record_id, expected in data.expected.items():
        assert captions[record_id]["caption"] == expected, record_id
    for record_id, error_type in data.bad.items():
        assert failures[record_id]["error"]["type"] == error_type
    return captions, failures


@pytest.mark.parametrize("mode", [
    ["--direct_running_mode=in_memory"],
    ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
], ids=["in_memory", "multi_processing"])
def test_every_record_gets_the_caption_of_its_own_image(dataset_factory, tmp_path, mode):
    data = dataset_factory(40, bad_records=True)
    with FakeVLMServer(FakeVLMConfig(api_key=API_KEY, latency_ms=20)) as server:
        result = run_cli([*TEST_RUNNER, *mode, "--input", ",".join(data.manifests),
                          "--api_url", server.url, "--model", "fake-vlm",
                          "--image_root", str(data.root), "--max_concurrency", "8"],
                         tmp_path / "out", env={"DF_API_KEY": API_KEY})
        stats = server.stats()
    assert result.returncode == 0, result.stderr[-3000:]
    captions, failures = check_every_record_once(result, data)
    # Records come back unchanged, plus caption and caption_meta.
    record = captions["r3"]
    assert record["image"] == ["images/img00003.png"]
    assert record["conversation"] == [{"from": "human", "value": "Describe image 3."}]
    meta = record["caption_meta"]
    assert meta["model"] == "fake-vlm" and meta["attempts"] == 1
    assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] > 0
    assert meta["finish_reason"] == "stop" and meta["latency_ms"] >= 20
    # Failures carry the record, its source and a typed error.
    missing = failures["missing"]
    assert missing["error"]["stage"] == "image" and missing["error"]["attempts"] == 0
    assert missing["source"]["file"] == data.manifests[0]
    assert missing["key"].startswith(data.manifests[0])
    assert failures["rejected"]["error"]["stage"] == "request"
    # One request per good record (plus the rejected one), none repeated.
    assert stats["requests"] == 41 and stats["max_in_flight"] <= 8 * (2 if len(mode) == 2 else 1)
    summary = result.summary
    assert (summary["records"], summary["captioned"], summary["failed"]) == (42, 40, 2)
    assert summary["failed_by_type"] == {"image/image_not_found": 1, "request/content_policy": 1}
    assert summary["tokens"]["prompt"] == sum(c["caption_meta"]["prompt_tokens"]
                                              for c in captions.values())
    assert "captioned 40 of 42 records" in result.stdout


def test_api_key_never_written_anywhere(dataset_factory, tmp_path):
    data = dataset_factory(6, bad_records=True)
    with FakeVLMServer(FakeVLMConfig(api_key=API_KEY)) as server:
        result = run_cli([*TEST_RUNNER, "--input", data.manifests[0], "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--api_key_env", "MY_KEY"],
                         tmp_path / "out", env={"MY_KEY": API_KEY})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.captions
    assert API_KEY not in result.stdout + result.stderr
    for path in glob.glob(str(tmp_path / "out" / "**"), recursive=True):
        if os.path.isfile(path):
            assert API_KEY not in open(path, encoding="utf-8", errors="replace").read(), path
    assert result.summary["options"]["api_key_env"] == "MY_KEY"


def test_prompt_flag_and_relative_paths_from_cwd(dataset_factory, tmp_path):
    data = dataset_factory(4, files=1)
    with FakeVLMServer() as server:
        result = run_cli([*TEST_RUNNER, "--input", "manifest0.jsonl", "--api_url", server.url,
                          "--model", "fake-vlm", "--prompt", "Alt text please",
                          "--output_key", "alt_text", "--num_shards", "2"],
                         tmp_path / "out", cwd=data.root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == [
        "captions-00000-of-00002.jsonl", "captions-00001-of-00002.jsonl",
        "failures-00000-of-00002.jsonl", "failures-00001-of-00002.jsonl", "summary.json"]
    assert {r["id"]: r["alt_text"] for r in result.captions} == data.expected


@pytest.mark.parametrize("args, message", [
    (["--input", "x.jsonl", "--api_url", "http://127.0.0.1:9/v1"], "--model"),
    (["--input", "nothing-here-*.jsonl", "--api_url", "http://127.0.0.1:9/v1", "--model", "m"],
     "no manifest file matches"),
])
def test_usage_errors_exit_2_with_one_clear_line(tmp_path, args, message):
    result = run_cli([*TEST_RUNNER, *args], tmp_path / "out", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_worker_pools_follow_the_cores_the_process_may_use():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from beam_caption.core.engine import usable_cores; print(usable_cores())")
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert pinned.stdout.strip() == "1"


def test_demo_captions_the_bundled_samples_quietly(tmp_path):
    # A real process: what a fresh one prints, Beam's import included, is under test.
    result = run_cli_process(["demo", *TEST_RUNNER], tmp_path / "demo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAKE VLM server at http://127.0.0.1:" in result.stdout
    assert "captioned 11 of 11 records (0 failed)" in result.stdout
    assert len(result.captions) == 11 and not result.failures
    assert all(c["caption"].startswith("A fake caption:") for c in result.captions)
    assert "WARNING" not in result.stderr and "apitools" not in result.stderr, result.stderr


def test_cli_log_filter_drops_only_beams_apitools_line():
    code = ("import logging, beam_caption.__main__\n"
            "logging.warning('apitools not found, and bigquery client libraries ...')\n"
            "logging.warning('%d records', 'not a number')  # a bad call must not raise\n"
            "logging.warning('kept')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "apitools" not in result.stderr and "kept" in result.stderr
