"""The recipes of pipelines/: the one users copy run as a script, as its docstring says; the
others through their ``main`` in this process (``run_recipe``)."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

from conftest import TEST_RUNNER, run_cli
from test_recipes_launch import run_recipe

from beam_caption.testing import FakeVLMConfig, FakeVLMServer

REPO = Path(__file__).resolve().parents[1]


def test_recipe_captions_the_sample_manifest(tmp_path):
    manifest = REPO / "data" / "image_caption" / "sample_data.json"
    records = json.loads(manifest.read_text())
    with FakeVLMServer() as server:
        process = subprocess.run(
            [sys.executable, "pipelines/image_caption.py", "--images_file", str(manifest),
             "--output", str(tmp_path / "out"), "--api_url", server.url, "--model", "fake-vlm",
             *TEST_RUNNER],
            cwd=REPO, capture_output=True, text=True, timeout=240)
        requests = server.stats()["requests"]
    assert process.returncode == 0, process.stderr[-3000:]
    captions = [json.loads(line) for path in glob.glob(str(tmp_path / "out" / "captions-*"))
                for line in open(path)]
    failures = [line for path in glob.glob(str(tmp_path / "out" / "failures-*"))
                for line in open(path)]
    assert len(captions) == len(records) and not failures
    assert requests == len(records)
    assert all(c["caption"].startswith("A fake caption:") for c in captions)
    assert f"captioned {len(records)} of {len(records)} records" in process.stdout
    assert not (tmp_path / "out" / ".checkpoint").exists()


def read_lines(pattern: str) -> list[dict]:
    return [json.loads(line) for path in sorted(glob.glob(pattern)) for line in open(path)]


SAMPLE = REPO / "data" / "image_caption"


def test_several_prompts_recipe_answers_each_prompt_under_its_key(tmp_path):
    with FakeVLMServer() as server:
        status, _, stderr = run_recipe("several_prompts", "--input",
                                       str(SAMPLE / "sample_data.json"),
                                       "--output", str(tmp_path / "out"),
                                       "--api_url", server.url, "--model", "fake-vlm")
        requests = server.stats()["requests"]
    assert status == 0, stderr[-3000:]
    assert not (tmp_path / "out" / ".checkpoint").exists()
    captions = read_lines(str(tmp_path / "out" / "captions-*"))
    assert captions and requests == 3 * len(captions)
    for line in captions:
        assert set(line["caption_meta"]["prompts"]) == {"caption", "alt_text", "has_people"}
        assert line["caption"] == line["alt_text"]  # the fake's one answer, whatever the prompt
        # has_people's own max_tokens (3) cut the fake's answer: each prompt has its parameters
        assert line["caption"].startswith(line["has_people"]) and len(line["has_people"]) == 12
        assert line["caption_meta"]["prompts"]["has_people"]["finish_reason"] == "length"


def test_tagging_recipe_keeps_json_tags_and_counts_them(tmp_path):
    with FakeVLMServer() as server:
        status, _, stderr = run_recipe("tagging", "--input", str(SAMPLE / "sample_data.json"),
                                       "--output", str(tmp_path / "out"),
                                       "--api_url", server.url, "--model", "fake-vlm")
    assert status == 0, stderr[-3000:]
    assert not (tmp_path / "out" / ".checkpoint").exists()
    captions = read_lines(str(tmp_path / "out" / "captions-*"))
    assert captions and all(isinstance(c["tags"]["objects"], list) for c in captions)
    counts = json.loads((tmp_path / "out" / "tag_counts.json").read_text())
    assert counts["scene:indoor"] == len(captions)  # the fake answers an enum's first value
    assert counts["object:fake"] == len(captions)  # "A fake caption: ..." -> words as objects


def test_recaption_failures_recipe_retries_what_may_succeed(dataset_factory, tmp_path):
    data = dataset_factory(8, bad_records=True)
    first = tmp_path / "first"
    with FakeVLMServer(FakeVLMConfig(fail_first=1)) as server:
        result = run_cli([*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url",
                          server.url, "--model", "fake-vlm", "--image_root", str(data.root),
                          "--max_retries", "0", "--skip_preflight"], first)
        assert result.returncode == 0 and not result.captions  # every first answer is a 503
        status, stdout, stderr = run_recipe(
            "recaption_failures", "--from_output", str(first), "--output",
            str(tmp_path / "again"), "--image_root", str(data.root),
            "--api_url", server.url, "--model", "fake-vlm")
    assert status == 0, stderr[-3000:]
    assert not (tmp_path / "again" / ".checkpoint").exists()
    retried = {c["id"]: c["caption"] for c in read_lines(str(tmp_path / "again" / "captions-*"))}
    assert retried == data.expected  # the bad records' failures were not retryable: left
    assert f"retrying {len(data.expected)} records" in stdout
    assert f"captioned {len(data.expected)} of {len(data.expected)} records" in stdout
