"""Dry runs and templates only translate: no storage access, no request, no job, exit 0 with a
short report; the Dataflow dry run with gs:// paths runs in seconds with no network."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_RUNNER

from beam_caption.cli.launcher import run, translate
from beam_caption.cli.main import main
from beam_caption.core.errors import UsageError

REPO = Path(__file__).parents[1]
DATAFLOW = ["--runner", "DataflowRunner", "--project", "my-project", "--region", "us-central1",
            "--temp_location", "gs://bucket/tmp"]
JOB = ["--input", "gs://bucket/manifests/*.jsonl", "--output", "gs://bucket/captions",
       "--image_root", "gs://bucket/images", "--api_url", "https://api.example.com/v1",
       "--model", "gpt-4o-mini"]


def _offline_command(command: list[str]) -> list[str]:
    """``command`` in a loopback-only network namespace where this machine allows one (root on
    Linux); as it is elsewhere (CI runs offline anyway)."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh",
                *command]
    return command


def test_a_dataflow_dry_run_with_gs_paths_translates_offline_in_seconds():
    pytest.importorskip("apitools", reason="DataflowRunner needs the gcp extra")
    command = _offline_command([
        sys.executable, "-m", "beam_caption", *JOB, *DATAFLOW, "--dry_run", "True",
        "--max_num_workers", "5", "--max_requests_per_minute", "500",
        "--api_key_secret", "projects/my-project/secrets/openai/versions/latest",
        "--setup_file", "./setup.py"])
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert took < 30, took
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dry run: DataflowRunner would run ") and "no job" in lines[0]
    assert "CaptionManifests/CaptionImages" in lines[1]
    assert lines[2] == "  workers get beam_caption from: --setup_file ./setup.py"
    assert "Traceback" not in result.stderr


def test_a_local_dry_run_builds_the_graph_and_touches_nothing(tmp_path):
    output = tmp_path / "out"
    translation = translate([*TEST_RUNNER, "--input", str(tmp_path / "absent.jsonl"),
                             "--output", str(output), "--api_url", "http://unused.invalid/v1",
                             "--model", "m", "--dry_run", "True",
                             "--api_key_file", str(tmp_path / "no-such-key")])
    assert translation.runner == "FnApiRunner" and translation.template_location is None
    assert any(step.startswith("CaptionManifests/CaptionImages/") for step in translation.steps)
    assert translation.package_source.startswith("the launcher's own environment")
    assert not output.exists()  # no output check, no manifest match, no key read, no request


def test_the_cli_reports_a_dry_run_and_exits_0(tmp_path, capsys):
    assert main([*TEST_RUNNER, "--input", str(tmp_path / "m.jsonl"), "--output",
                 str(tmp_path / "out"), "--api_url", "http://unused.invalid/v1", "--model", "m",
                 "--dry_run", "True"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: FnApiRunner would run ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--dry_run", "False"], "Beam takes any value as true"),
    (["--template_location", "gs://bucket/t.json"], "--template_location makes a Dataflow"),
])
def test_a_misleading_dry_run_is_refused(flags, message):
    with pytest.raises(UsageError, match=message):
        translate([*TEST_RUNNER, *JOB, *flags])


def test_a_dataflow_dry_run_needs_a_temp_location_and_a_valid_project():
    pytest.importorskip("apitools", reason="DataflowRunner needs the gcp extra")
    without_temp = [flag for flag in DATAFLOW if "tmp" not in flag and flag != "--temp_location"]
    with pytest.raises(UsageError, match="needs --temp_location"):
        translate([*JOB, *without_temp, "--dry_run", "True"])
    bad_project = [*DATAFLOW]
    bad_project[bad_project.index("my-project")] = "p"
    with pytest.raises(UsageError, match=r"DataflowRunner refuses the options: Invalid Project"):
        translate([*JOB, *bad_project, "--dry_run", "True"])


def test_run_refuses_a_dry_run_and_translate_a_job():
    with pytest.raises(UsageError, match="use translate"):
        run([*TEST_RUNNER, *JOB, "--dry_run", "True"])
    with pytest.raises(UsageError, match="needs --dry_run True or --template_location"):
        translate([*TEST_RUNNER, *JOB])
