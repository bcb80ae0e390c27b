"""The recipe users copy, pipelines/image_caption.py, run as its docstring says."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

from conftest import TEST_RUNNER

from beam_caption.testing import FakeVLMServer

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
