"""How the CLI starts and ends: ``estimate`` and ``report`` start without importing Beam, and
``--max_failure_rate`` turns a run with too many failed records into exit status 3, after
every output is written."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_RUNNER, make_dataset, read_jsonl

from beam_caption.cli.estimate import JOB_FLAGS
from beam_caption.cli.estimate import parser as estimate_parser
from beam_caption.cli.flags import CaptionOptions
from beam_caption.cli.main import TOO_MANY_FAILURES, main
from beam_caption.testing import FakeVLMServer

GOOD, BAD = 6, 2  # make_dataset(bad_records=True) adds a missing image and a refused prompt


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), GOOD, files=1, bad_records=True)


@pytest.fixture(scope="module")
def server():
    with FakeVLMServer() as fake:
        yield fake


def _run(dataset, server, output: Path, *flags: str) -> tuple[int, str, str]:
    """``main([...])`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([*TEST_RUNNER, "--input", dataset.manifests[0], "--output", str(output),
                       "--api_url", server.url, "--model", "fake-vlm",
                       "--image_root", str(dataset.root), "--no_progress", *flags])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def over_the_rate(dataset, server, tmp_path_factory):
    """A run whose 2 failures of 8 records pass --max_failure_rate 0.2."""
    output = tmp_path_factory.mktemp("over") / "out"
    return (*_run(dataset, server, output, "--max_failure_rate", "0.2"), output)


def test_past_the_failure_rate_the_run_exits_3_with_every_output_written(over_the_rate):
    status, stdout, stderr, output = over_the_rate
    assert status == TOO_MANY_FAILURES == 3
    assert stderr.strip().splitlines() == [
        "beam_caption: error: 2 of 8 records failed (25.0%), over --max_failure_rate 0.2; "
        "the outputs are written"]
    assert f"captioned {GOOD} of {GOOD + BAD} records ({BAD} failed)" in stdout
    assert len(read_jsonl(str(output / "captions-*.jsonl"))) == GOOD
    assert len(read_jsonl(str(output / "failures-*.jsonl"))) == BAD
    summary = json.loads((output / "summary.json").read_text())
    assert summary["failed"] == BAD and summary["options"]["max_failure_rate"] == 0.2


@pytest.mark.parametrize("flags", [(), ("--max_failure_rate", "0.25")])
def test_failures_at_or_under_the_rate_exit_0_and_the_end_line_says_so(dataset, server,
                                                                       tmp_path, flags):
    status, stdout, stderr = _run(dataset, server, tmp_path / "out", *flags)
    assert status == 0, stderr
    said = [line for line in stdout.splitlines() if "leave the exit status 0" in line]
    if flags:  # the limit is the user's: nothing more to say
        assert said == []
    else:
        assert said == [f"  the failed records are in {tmp_path / 'out'}/failures-*.jsonl; "
                        "they leave the exit status 0 (--max_failure_rate SHARE makes the run "
                        "exit 3 past that share)"]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "half"])
def test_a_failure_rate_out_of_0_to_1_is_a_usage_error(capsys, tmp_path, value):
    assert main(["--input", "m.jsonl", "--output", str(tmp_path / "out"), "--api_url",
                 "http://127.0.0.1:9/v1", "--model", "m", "--max_failure_rate", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("beam_caption: error: argument --max_failure_rate: ")
    assert not (tmp_path / "out").exists()


# One fresh process runs estimate, report and --help through main(), then says which of them
# ran and whether Beam was imported (a fresh interpreter: this one has Beam already).
_START_UP = """
import contextlib, io, json, sys
from beam_caption.cli.main import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()):
        codes.append(main(argv))
beam = sorted(name for name in sys.modules if name.startswith("apache_beam"))
print(json.dumps({"codes": codes, "beam": beam}))
"""


def test_estimate_report_and_help_start_without_importing_beam(dataset, over_the_rate):
    commands = [["estimate", "--input", dataset.manifests[0], "--image_root", str(dataset.root)],
                ["report", str(over_the_rate[3])], ["--help"]]
    process = subprocess.run([sys.executable, "-c", _START_UP, json.dumps(commands)],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-2000:]
    assert json.loads(process.stdout.splitlines()[-1]) == {"codes": [0, 0, 0], "beam": []}
    assert (over_the_rate[3] / "report.html").exists()


def test_estimate_takes_the_jobs_own_flags_from_the_one_table():
    """Each flag estimate shares with a job is the job's own: same type, default, choices."""
    job_parser = argparse.ArgumentParser()
    CaptionOptions._add_argparse_args(job_parser)
    job_actions = {action.dest: action for action in job_parser._actions}
    own = {action.dest: action for action in estimate_parser()._actions}
    assert set(JOB_FLAGS) <= set(own)
    for name in JOB_FLAGS:
        assert (own[name].type, own[name].default, own[name].choices) == (
            job_actions[name].type, job_actions[name].default, job_actions[name].choices)
