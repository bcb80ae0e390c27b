"""Shared benchmark helpers: generated images and manifests, the fake VLM server in its own
process, the captioning stage (the real DoFn, driven outside a pipeline), process-tree RSS and CPU
sampling, repeated measurements and the results table.

Everything here needs only the package's own dependencies (Pillow, the fake server).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils import shared
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from beam_caption.cli.config import caption_config
from beam_caption.cli.flags import CaptionOptions
from beam_caption.core.engine import WorkerConfig
from beam_caption.core.records import FAILURES
from beam_caption.testing.fake_vlm import spawn_fake_vlm
from beam_caption.transforms.caption import _CaptionRecords

SAMPLE_INTERVAL_S = 0.05
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Generated data


def photo(width: int, height: int, seed: int = 0, noise_sigma: float = 6.0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients, blurred shapes, thin lines, mild noise.

    The large structures are drawn at 1/8 scale and upsampled (smooth, like out-of-focus
    areas); lines and per-pixel Gaussian noise (sigma ``noise_sigma`` levels) add the fine
    detail and sensor grain that make JPEG decoding cost what it costs for a camera photo.
    """
    rng = random.Random(seed)
    small = (max(64, width // 8), max(48, height // 8))
    gradient = Image.linear_gradient("L")
    img = Image.merge("RGB", (gradient.resize(small), Image.radial_gradient("L").resize(small),
                              gradient.rotate(90 + seed % 180).resize(small)))
    draw = ImageDraw.Draw(img)
    shortest = min(small)
    for _ in range(40):
        x, y = rng.randrange(small[0]), rng.randrange(small[1])
        side = rng.randrange(max(2, shortest // 20), shortest // 3)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + side, y + side * 2 // 3), fill=_random_colour(rng))
    img = img.filter(ImageFilter.GaussianBlur(1)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(200):
        x, y = rng.randrange(width), rng.randrange(height)
        end = (x + rng.randrange(-width // 10, width // 10 + 1),
               y + rng.randrange(-height // 10, height // 10 + 1))
        draw.line((x, y, *end), fill=_random_colour(rng), width=rng.randrange(1, 4))
    noise = Image.merge("RGB", [Image.effect_noise((width, height), noise_sigma)] * 3)
    return ImageChops.add(img, noise, 1, -128)


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """``img`` as JPEG / WEBP (at ``quality``) or PNG bytes."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **({} if fmt == "PNG" else {"quality": quality}))
    return buffer.getvalue()


def write_small_images(directory: Path, count: int) -> list[str]:
    """``count`` distinct small JPEGs (96x64 .. 160x120, varied colours); their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes = ((96, 64), (64, 96), (120, 120), (160, 120))
    paths = []
    for i in range(count):
        img = Image.new("RGB", sizes[i % len(sizes)], ((i * 37) % 256, (i * 91) % 256, i % 256))
        ImageDraw.Draw(img).ellipse((8, 8, 48, 40), fill=((i * 53) % 256, 200, 30))
        path = directory / f"small{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def write_photo_copies(directory: Path, count: int, size: tuple[int, int],
                       distinct: int = 8) -> list[str]:
    """``count`` photo JPEGs (q90) of ``size``: ``distinct`` generated photos, copied
    round-robin."""
    directory.mkdir(parents=True, exist_ok=True)
    originals = []
    for seed in range(distinct):
        path = directory / f"photo{seed:05d}.jpg"
        path.write_bytes(encode(photo(*size, seed=seed), "JPEG"))
        originals.append(path)
    paths = []
    for i in range(count):
        path = directory / f"photo{i:05d}.jpg"
        if i >= distinct:
            shutil.copyfile(originals[i % distinct], path)
        paths.append(str(path))
    return paths


def write_manifest(path: Path, image_paths: list[str], records: int,
                   distinct: int | None = None, first: int = 0) -> Path:
    """A JSONL manifest of ``records`` records, record i naming image i mod len(image_paths)
    and a prompt of its own (no two records are the same request); with ``distinct``, the
    prompt is that of record i mod distinct, so with distinct == len(image_paths) record
    i + distinct repeats record i's request under another id. Records are numbered from
    ``first`` (several manifests of one job)."""
    with open(path, "w", encoding="utf-8") as out:
        for i in range(first, first + records):
            label = str(i if distinct is None else i % distinct)
            out.write(json.dumps({"id": f"r{i}", "image": [image_paths[i % len(image_paths)]],
                                  "conversation": conversation(label)}) + "\n")
    return path


def conversation(label: str) -> list[dict]:
    """A one-turn conversation naming ``label``: distinct labels make distinct requests, so
    the worker's request cache (same image + prompt = one request) never answers for the server."""
    return [{"from": "human", "value": f"Generate a detailed caption for image {label}."}]


def elements(image_paths: list[str], count: int, run: str) -> list[dict]:
    """Keyed record elements as ReadManifests makes them, for driving the Stage directly;
    record i names image i mod len(image_paths) and a prompt unique to (run, i)."""
    return [{"key": f"{run}#{i}", "source": {"file": run, "index": i},
             "record": {"id": f"r{i}", "image": [image_paths[i % len(image_paths)]],
                        "conversation": conversation(f"{run}-{i}")}}
            for i in range(count)]


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"beam_caption_{prefix}_")


# ---------------------------------------------------------------------------------------------
# The fake server and the captioning stage


class FakeVLM:
    """The fake VLM server in its own process: ``with FakeVLM(["--latency_ms", "100"]) as vlm``."""

    def __init__(self, args: list[str]):
        self._args = args

    def __enter__(self) -> FakeVLM:
        self.process, self.url = spawn_fake_vlm(self._args)
        self.pid = self.process.pid
        self._root = self.url.removesuffix("/v1")
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.terminate()
        self.process.wait(10)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self._root}/stats") as response:
            return json.loads(response.read())

    def reset_stats(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self._root}/stats/reset", method="POST"))


def stage_config(api_url: str, concurrency: int, image_root: str, *flags: str) -> WorkerConfig:
    """The worker config the CLI would build from these flags (model fake-vlm)."""
    options = PipelineOptions(["--input", "unused", "--output", "unused", "--api_url", api_url,
                               "--model", "fake-vlm", "--max_concurrency", str(concurrency),
                               "--image_root", image_root, *flags])
    return caption_config(options.view_as(CaptionOptions))


class Stage:
    """The captioning stage as a worker runs it: the real CaptionImages DoFn, set up once
    (its CaptionRuntime is reused by every pass), one bundle per ``run``."""

    def __init__(self, config: WorkerConfig):
        self.dofn = _CaptionRecords(config, shared.Shared())
        self.dofn.setup()

    def run(self, items: list[dict]) -> StageRun:
        """One bundle: every item through process(), then finish_bundle(); timed end to end."""
        outputs: list = []
        window = GlobalWindow()
        timestamp = window.max_timestamp()
        started = time.perf_counter()
        self.dofn.start_bundle()
        for item in items:
            outputs.extend(self.dofn.process(item, timestamp, window))
        outputs.extend(self.dofn.finish_bundle())
        seconds = time.perf_counter() - started
        failures = [output.value for output in outputs if isinstance(output, TaggedOutput)
                    and output.tag == FAILURES]
        captions = [output.value for output in outputs if not isinstance(output, TaggedOutput)]
        return StageRun(seconds, len(captions), len(failures), captions, failures)


@dataclass
class StageRun:
    """One pass of the captioning stage: seconds from first record to last result, captions."""

    seconds: float
    captioned: int
    failed: int
    outputs: list[dict]
    failures: list[dict] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return (self.captioned + self.failed) / self.seconds


# ---------------------------------------------------------------------------------------------
# Process measurements (from /proc: no psutil needed)


def _stat_cpu_seconds(stat_path: str) -> float:
    with open(stat_path) as stat:
        fields_ = stat.read().rpartition(")")[2].split()
    return (int(fields_[11]) + int(fields_[12])) / _CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process's live threads, summed by thread name with a
    pool's ``_N`` suffix dropped (``beam-caption-image_0`` and ``_1`` -> ``beam-caption-image``)."""
    totals: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            seconds = _stat_cpu_seconds(f"/proc/self/task/{thread.native_id}/stat")
        except OSError:  # the thread ended meanwhile
            continue
        name = re.sub(r"_\d+$", "", thread.name)
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


class CpuMeter:
    """CPU use over a block, as fractions of one core: ``with CpuMeter({"server": pid}) as cpu``
    then ``cpu.processes["server"]``, and ``cpu.threads`` for this process's threads by name."""

    def __init__(self, pids: dict[str, int]):
        self._pids = pids

    def __enter__(self) -> CpuMeter:
        self._processes = {name: process_cpu_seconds(pid) for name, pid in self._pids.items()}
        self._threads = thread_cpu_seconds()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        wall = time.perf_counter() - self._wall
        self.processes = {name: (process_cpu_seconds(pid) - self._processes[name]) / wall
                          for name, pid in self._pids.items()}
        self.threads = {name: (seconds - self._threads.get(name, 0.0)) / wall
                        for name, seconds in thread_cpu_seconds().items()}

    def busiest_threads(self, count: int = 4) -> str:
        ranked = sorted(self.threads.items(), key=lambda item: -item[1])[:count]
        return ", ".join(f"{name} {busy:.2f}" for name, busy in ranked)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    ppid = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, summed."""
    tree, stack, total = _children(), [pid], 0
    while stack:
        current = stack.pop()
        total += _rss_bytes(current)
        stack.extend(tree.get(current, ()))
    return total


class PeakRss:
    """Peak resident memory of a process tree, polled every 50 ms in a background thread:
    ``with PeakRss(pid) as rss: ...`` then ``rss.peak`` (bytes); ``measure`` polls another
    figure of ``pid`` (whatever it takes) instead."""

    def __init__(self, pid, measure: Callable[[Any], int] = tree_rss_bytes):
        self._pid = pid
        self._measure = measure
        self._stop = threading.Event()
        self.peak = 0

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while True:
            self.peak = max(self.peak, self._measure(self._pid))
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return


@dataclass
class CliRun:
    """One ``python -m beam_caption`` process: wall time from spawn to exit, memory, summary."""

    wall_s: float
    tree_peak_rss: int  # bytes: the process and its children, polled every 50 ms
    max_rss: int  # bytes: the kernel's peak RSS of the main process (wait4 ru_maxrss)
    summary: dict


def run_cli(manifest: Path, output: Path, api_url: str, concurrency: int, image_root: Path,
            *flags: str) -> CliRun:
    """Run the CLI in a subprocess and time it from process start to exit."""
    command = [sys.executable, "-m", "beam_caption", "--input", str(manifest),
               "--output", str(output), "--api_url", api_url, "--model", "fake-vlm",
               "--image_root", str(image_root), "--max_concurrency", str(concurrency),
               "--runner=FnApiRunner", *flags]
    log_path = output.with_name(output.name + ".log")
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with PeakRss(process.pid) as rss:
            _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"the CLI exited with {process.returncode}:\n"
                           f"{log_path.read_text()[-3000:]}")
    summary = json.loads((output / "summary.json").read_text())
    return CliRun(wall, rss.peak, usage.ru_maxrss * 1024, summary)


# ---------------------------------------------------------------------------------------------
# Statistics and the results table


@dataclass
class Spread:
    """Median and range of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        if len(self.values) == 1:
            return _fmt(self.values[0])
        return (f"{_fmt(self.median)} [{_fmt(min(self.values))}-{_fmt(max(self.values))}, "
                f"n={len(self.values)}]")


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


@dataclass
class Row:
    """One figure: ``ratio = median / ideal``; PASS when the median meets ``target``
    (``higher_is_better`` says which way); ``target`` None makes the row informational."""

    figure: str
    measured: Spread
    unit: str
    ideal: float | None = None
    target: float | None = None
    higher_is_better: bool = True

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        value = self.measured.median
        met = value >= self.target if self.higher_is_better else value <= self.target
        return "PASS" if met else "MISS"

    def cells(self) -> list[str]:
        sign = ">=" if self.higher_is_better else "<="
        return [self.figure, f"{self.measured} {self.unit}",
                "" if self.target is None else f"{sign} {_fmt(self.target)}",
                "" if self.ideal is None else _fmt(self.ideal),
                "" if not self.ideal else f"{self.measured.median / self.ideal:.2f}",
                self.verdict]


@dataclass
class Table:
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def print(self) -> None:
        header = ["figure", "measured: median [min-max, n]", "target", "ideal", "ratio", ""]
        lines = [header] + [row.cells() for row in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        print(f"\n## {self.title}\n")
        for i, line in enumerate(lines):
            cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            print("  ".join(cells).rstrip())
            if i == 0:
                print("  ".join("-" * width for width in widths))
        for note in self.notes:
            print(f"  * {note}")


def parse_args(description: str, profile: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and smaller datasets: a smoke run, not the figures")
    if profile:
        parser.add_argument("--profile", type=Path, metavar="DIR",
                            help="also profile one pass with py-spy, raw files into DIR")
    return parser.parse_args()


def load_note() -> str:
    """The 1-minute load average beside the core count, to judge disturbance by other work."""
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the end of the run"
