"""Shared fixtures: generated image datasets and running the real CLI in a subprocess."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from beam_caption.core.client import ClientSettings
from beam_caption.core.engine import WorkerConfig
from beam_caption.core.images import ImageSettings
from beam_caption.core.messages import PromptSettings
from beam_caption.testing import caption_for_images

LEVELS = (0, 51, 102, 153, 204, 255)
SIZES = ((96, 64), (64, 96), (80, 80))  # landscape, portrait, square
TEST_RUNNER = ["--runner=FnApiRunner"]


def colour(i: int) -> tuple[int, int, int]:
    return LEVELS[i % 6], LEVELS[(i // 6) % 6], LEVELS[(i // 36) % 6]


@dataclass
class Dataset:
    """A manifest of generated images and the caption the fake server must give each record."""

    root: Path
    manifests: list[str] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)  # record id -> caption
    bad: dict[str, str] = field(default_factory=dict)  # record id -> expected error type

    @property
    def total(self) -> int:
        return len(self.expected) + len(self.bad)


def make_image(root: Path, i: int, fmt: str = "png") -> tuple[str, str]:
    """Write image i and return (relative path, its caption).

    Colour and orientation together are unique for i < 648, and so is the caption.
    """
    size = SIZES[(i + i // 216) % 3]
    image = Image.new("RGB", size, colour(i * 7 + 1))
    name = f"images/img{i:05d}.{fmt}"
    (root / "images").mkdir(parents=True, exist_ok=True)
    image.save(root / name)
    return name, caption_for_images([image])


def make_dataset(root: Path, n: int, *, files: int = 2, bad_records: bool = False) -> Dataset:
    """n good records over `files` manifests (alternating JSONL and JSON array)."""
    data = Dataset(root)
    per_file: list[list[dict]] = [[] for _ in range(files)]
    for i in range(n):
        name, caption = make_image(root, i, "jpg" if i % 4 == 0 else "png")
        record = {"id": f"r{i}", "image": [name],
                  "conversation": [{"from": "human", "value": f"Describe image {i}."}]}
        per_file[i % files].append(record)
        data.expected[record["id"]] = caption
    if bad_records:
        per_file[0].append({"id": "missing", "image": ["images/nope.png"],
                            "conversation": [{"from": "human", "value": "q"}]})
        data.bad["missing"] = "image_not_found"
        per_file[0].append({"id": "rejected", "image": [make_image(root, 9999)[0]],
                            "conversation": [{"from": "human", "value": "REJECT_400 please"}]})
        data.bad["rejected"] = "content_policy"
    for index, records in enumerate(per_file):
        if index % 2 == 0:
            path = root / f"manifest{index}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path = root / f"manifest{index}.json"
            path.write_text(json.dumps(records, indent=1))
        data.manifests.append(str(path))
    return data


def read_jsonl(pattern: str) -> list[dict]:
    lines = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as handle:
            lines.extend(json.loads(line) for line in handle if line.strip())
    return lines


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    output: Path

    @property
    def captions(self) -> list[dict]:
        return read_jsonl(str(self.output / "captions-*.jsonl"))

    @property
    def failures(self) -> list[dict]:
        return read_jsonl(str(self.output / "failures-*.jsonl"))

    @property
    def summary(self) -> dict:
        return json.loads((self.output / "summary.json").read_text())


def run_cli(args: list[str], output: Path, *, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 240) -> RunResult:
    """Run ``python -m beam_caption ARGS --output OUTPUT`` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    process = subprocess.run(
        [sys.executable, "-m", "beam_caption", *args, "--output", str(output)],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)
    return RunResult(process.returncode, process.stdout, process.stderr, output)


@pytest.fixture
def dataset_factory(tmp_path):
    return lambda n, **kw: make_dataset(tmp_path / "data", n, **kw)


def runtime_config(api_url, image_root, max_concurrency=8, **overrides) -> WorkerConfig:
    """A worker WorkerConfig for in-process tests of the caption runtime."""
    return WorkerConfig(
        client=ClientSettings(api_url=str(api_url), model="fake-vlm",
                              max_concurrency=max_concurrency),
        prompts=PromptSettings(system_prompt=None), images=ImageSettings(),
        image_root=str(image_root), **overrides)
