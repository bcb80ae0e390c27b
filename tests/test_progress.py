"""Live progress (cli/progress.py, core/figures.py): workers' figure files, the launcher's bar
and plain lines, the manifest count, and the real CLI's progress on stderr against the fake VLM
server."""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time

import apache_beam as beam
import pytest
from conftest import TEST_RUNNER, run_cli

from beam_caption.cli.progress import (
    LOG_INTERVAL_ENV,
    ProgressDisplay,
    count_records,
    live_progress,
    progress_line,
)
from beam_caption.core.figures import FIELDS, figures_for, read_totals
from beam_caption.core.manifest_reader import iter_manifest
from beam_caption.testing import FakeVLMConfig, FakeVLMServer
from beam_caption.transforms.manifests import ReadManifestFiles

FIGURES = {"captioned": 3, "failed": 1, "images": 5, "prompt_tokens": 100,
           "completion_tokens": 20, "throttled_ms": 1500}
RECORD = {"image": ["a.png"], "conversation": [{"from": "human", "value": "q"}]}
PROGRESS_PREFIX = "INFO beam_caption.progress: progress: "


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def write_manifest(path, records: int) -> str:
    path.write_text("".join(json.dumps(RECORD) + "\n" for _ in range(records)))
    return str(path)


def test_figures_of_several_processes_are_summed(tmp_path):
    progress_dir = str(tmp_path)
    code = ("import sys; from beam_caption.core.figures import figures_for\n"
            "figures = figures_for(sys.argv[1])\n"
            "for _ in range(50): figures.add(captioned=1, images=2, prompt_tokens=10)\n"
            "figures.add(failed=1, throttled_ms=250); figures.flush()")
    children = [subprocess.Popen([sys.executable, "-c", code, progress_dir]) for _ in range(2)]
    figures_for(progress_dir).add(resumed=4, completion_tokens=7)
    figures_for(progress_dir).flush()
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    assert len(glob.glob(os.path.join(progress_dir, "*.json"))) == 3
    assert read_totals(progress_dir) == {
        "captioned": 100, "failed": 2, "resumed": 4, "images": 200, "prompt_tokens": 1000,
        "completion_tokens": 7, "throttled_ms": 500}


def test_figures_are_shared_in_a_process_and_written_without_a_flush(tmp_path):
    figures = figures_for(str(tmp_path))
    assert figures_for(str(tmp_path)) is figures
    figures.add(captioned=2, images=3)
    wait_for(lambda: read_totals(str(tmp_path))["captioned"] == 2)
    assert read_totals(str(tmp_path))["images"] == 3
    assert not glob.glob(str(tmp_path / "*.tmp"))


def test_figures_without_a_directory_count_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    figures_for(None).add(captioned=1)
    figures_for(None).flush()
    assert os.listdir(tmp_path) == []


def test_the_plain_line_counts_resumed_records_as_done_but_not_in_the_rate():
    figures = {**dict.fromkeys(FIELDS, 0), "captioned": 9, "failed": 1, "resumed": 80,
               "images": 12, "prompt_tokens": 1200, "completion_tokens": 34, "throttled_ms": 2500}
    assert progress_line(figures, 100, elapsed=5.0) == (
        "progress: 90/100 records (90%), 2.0 rec/s, 2.4 img/s, 1 failed, 80 resumed, "
        "1,234 tokens, 2.5 s throttled, ETA 00:05")
    assert progress_line(figures, None, elapsed=5.0) == (
        "progress: 90 records, 2.0 rec/s, 2.4 img/s, 1 failed, 80 resumed, 1,234 tokens, "
        "2.5 s throttled")


def test_plain_lines_without_a_terminal(tmp_path, caplog):
    progress_dir = tmp_path / "progress"
    progress_dir.mkdir()
    figures_for(str(progress_dir)).add(**FIGURES)
    figures_for(str(progress_dir)).flush()
    stream = io.StringIO()
    display = ProgressDisplay(str(progress_dir), [write_manifest(tmp_path / "m.jsonl", 10)],
                              stream=stream, log_interval=0.05)
    display.start()

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "beam_caption.progress"]

    wait_for(lambda: any("4/10 records (40%)" in line for line in lines()))
    display.stop()
    last = lines()[-1]
    assert last.startswith("progress: 4/10 records (40%), ")
    for figure in ("1 failed", "120 tokens", "1.5 s throttled", "ETA "):
        assert figure in last
    assert stream.getvalue() == ""  # log lines, not bar output
    assert logging.getLogger("beam_caption.progress").level == logging.NOTSET  # restored


def test_bar_on_a_terminal_shows_done_of_total_and_failures(tmp_path):
    progress_dir = tmp_path / "progress"
    progress_dir.mkdir()
    figures_for(str(progress_dir)).add(**FIGURES)
    figures_for(str(progress_dir)).flush()
    terminal = Terminal()
    display = ProgressDisplay(str(progress_dir), [write_manifest(tmp_path / "m.jsonl", 10)],
                              stream=terminal)
    display.start()
    wait_for(lambda: "4/10" in terminal.getvalue())
    figures_for(str(progress_dir)).add(captioned=6, images=6)
    figures_for(str(progress_dir)).flush()
    display.stop()
    final = terminal.getvalue().rstrip().rsplit("\r", 1)[-1]
    assert final.startswith("captioning: 100%|") and "10/10 [" in final
    for figure in ("1 failed", "120 tokens", "1.5 s throttled]"):
        assert figure in final
    assert terminal.getvalue().endswith("\n")  # closed: the next output starts on a new line


def test_no_total_when_the_manifests_cannot_be_counted(tmp_path, caplog):
    progress_dir = tmp_path / "progress"
    progress_dir.mkdir()
    figures_for(str(progress_dir)).add(**FIGURES)
    figures_for(str(progress_dir)).flush()
    display = ProgressDisplay(str(progress_dir), [str(tmp_path / "gone.jsonl")],
                              stream=io.StringIO(), log_interval=60)
    display.start()
    time.sleep(0.2)  # the count fails at once
    display.stop()
    [line] = [r.getMessage() for r in caplog.records if r.name == "beam_caption.progress"]
    assert line.startswith("progress: 4 records, ") and "ETA" not in line


def test_live_progress_ends_with_the_final_line_only_when_the_job_succeeds(tmp_path, caplog,
                                                                          monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under pytest -s
    manifest = write_manifest(tmp_path / "m.jsonl", 3)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "beam_caption.progress"]

    with pytest.raises(KeyboardInterrupt), live_progress([manifest]) as progress_dir:
        figures_for(progress_dir).add(captioned=1)
        raise KeyboardInterrupt
    assert lines() == []  # the CLI's one line about the interruption comes next
    with live_progress([manifest]) as progress_dir:
        figures_for(progress_dir).add(captioned=1)
        figures_for(progress_dir).flush()
    assert len(lines()) == 1 and lines()[0].startswith("progress: 1")
    assert not os.path.exists(progress_dir)


JSONL = ("\ufeff" + json.dumps(RECORD) + "\r\n\n   \n" + json.dumps(RECORD) + "\n{not json\n"
         + json.dumps(RECORD))  # 4 elements: 3 records and a read failure
ARRAY = f'[{json.dumps(RECORD)}, 7, {{"a": nope}},\n {json.dumps(RECORD)},]'  # 4 elements


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_count_records_counts_what_read_manifests_emits(tmp_path, compress):
    files = []
    for name, text in (("m.jsonl", JSONL), ("m.json", ARRAY)):
        path = tmp_path / (name + ".gz" if compress else name)
        path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
        files.append(str(path))
    assert [count_records([file]) for file in files] == [4, 4]
    assert count_records(files) == sum(len(list(iter_manifest(file))) for file in files)


def test_count_records_of_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        count_records([str(tmp_path / "gone.jsonl")])


def test_read_failures_count_as_failed(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(f"{json.dumps(RECORD)}\n{{bad\n[1]\n{json.dumps(RECORD)}\n")
    progress_dir = tmp_path / "progress"
    progress_dir.mkdir()
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        _ = pipeline | ReadManifestFiles([str(manifest)], progress_dir=str(progress_dir))
    assert read_totals(str(progress_dir))["failed"] == 2


def run_job(data, tmp_path, *args: str):
    with FakeVLMServer(FakeVLMConfig(latency_ms=20)) as server:
        return run_cli([*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
                        "--model", "fake-vlm", "--image_root", str(data.root),
                        "--max_concurrency", "8", *args],
                       tmp_path / "out", env={LOG_INTERVAL_ENV: "0.2"})


def progress_lines(stderr: str) -> list[str]:
    return [line.removeprefix(PROGRESS_PREFIX) for line in stderr.splitlines()
            if line.startswith(PROGRESS_PREFIX)]


def check_true_totals(line: str, summary: dict) -> None:
    records = summary["records"]
    assert line.startswith(f"{records}/{records} records (100%), "), line
    for figure in (f"{summary['failed']} failed", f"{summary['tokens']['total']:,} tokens",
                   f"{summary['throttled_s']:.1f} s throttled"):
        assert figure in line, (figure, line)


@pytest.mark.parametrize("mode", [
    ["--direct_running_mode=in_memory", "--report"],
    ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
], ids=["in_memory", "multi_processing"])
def test_cli_progress_lines_end_with_the_true_totals(dataset_factory, tmp_path, mode):
    data = dataset_factory(30, bad_records=True)
    result = run_job(data, tmp_path, *mode)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = progress_lines(result.stderr)
    assert len(lines) >= 2, result.stderr[-3000:]
    assert result.summary["records"] == data.total
    check_true_totals(lines[-1], result.summary)
    assert "captioned 30 of 32 records" in result.stdout
    assert (tmp_path / "out" / "report.html").exists() == ("--report" in mode)


def test_cli_no_progress_prints_none(dataset_factory, tmp_path):
    data = dataset_factory(6)
    result = run_job(data, tmp_path, "--no_progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "progress" not in result.stderr
    assert not (tmp_path / "out" / "report.html").exists()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_cli_bar_on_a_pseudo_terminal(dataset_factory, tmp_path):
    import fcntl
    import struct
    import termios

    data = dataset_factory(20, bad_records=True)
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    written: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the last writer closed the terminal
                return
            if not chunk:
                return
            written.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with FakeVLMServer(FakeVLMConfig(latency_ms=20)) as server, \
            open(follower, "w", encoding="utf-8") as terminal:  # closes follower after it
        process = run_cli(
            [*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
             "--model", "fake-vlm", "--image_root", str(data.root)], tmp_path / "out",
            stderr=terminal)
    reader.join(timeout=10)
    os.close(leader)
    assert process.returncode == 0
    final = b"".join(written).decode().rstrip().rsplit("\r", 1)[-1]
    assert final.startswith("captioning: 100%|") and "| 22/22 [" in final, final
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert f"{summary['failed']} failed, {summary['tokens']['total']:,} tokens" in final
