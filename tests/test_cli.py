"""The CLI's clean exits: typos and bad values refused up front, secrets kept out of the
summary, and Ctrl-C or SIGTERM ending a run with one line and its captions checkpointed."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from conftest import TEST_RUNNER, make_dataset, read_jsonl, run_cli

from beam_caption.cli import flag_table
from beam_caption.cli.flags import CaptionOptions, check_flags, reported_options, validate_options
from beam_caption.cli.main import main
from beam_caption.core.api_keys import KeySource
from beam_caption.core.errors import UsageError
from beam_caption.core.settings import CaptionConfig
from beam_caption.testing import FakeVLMConfig, FakeVLMServer

INTERRUPTED = ("beam_caption: interrupted. Captions finished so far are checkpointed in the "
               "output directory; run the same command with --resume to continue.")


@pytest.fixture
def job(dataset_factory, tmp_path):
    """(server, flags of a 3-record job writing to tmp_path/out)."""
    data = dataset_factory(3, files=1)
    with FakeVLMServer() as server:
        yield server, [*TEST_RUNNER, "--input", data.manifests[0], "--api_url", server.url,
                       "--model", "fake-vlm", "--image_root", str(data.root),
                       "--output", str(tmp_path / "out")]


def refused(capsys, argv: list[str]) -> str:
    """The one line ``main(argv)`` prints to stderr when it refuses to start (exit 2)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith("beam_caption: error: ")
    return captured.err.strip().removeprefix("beam_caption: error: ")


@pytest.mark.parametrize("typo, message", [
    (["--max_concurency", "64"], "unknown flag --max_concurency (did you mean --max_concurrency?)"),
    (["--max_concurency=64"], "unknown flag --max_concurency (did you mean --max_concurrency?)"),
    (["--max_request_per_minute", "60"],
     "unknown flag --max_request_per_minute (did you mean --max_requests_per_minute?)"),
    (["--reusme"], "unknown flag --reusme (did you mean --resume?)"),
    (["extra.jsonl"], ("unexpected argument 'extra.jsonl' (a flag takes one value: repeat "
                       "--input or join manifests with commas)")),
    (["--jpeg_quality", "101"], "argument --jpeg_quality: must be from 1 to 100, got 101"),
    (["--max_concurrency", "0"], "argument --max_concurrency: must be >= 1, got 0"),
    (["--temperature", "-1"], "argument --temperature: must be >= 0, got -1.0"),
    (["--request_timeout", "nan"], "argument --request_timeout: must be > 0, got nan"),
    (["--prompt", "-x"], ("argument --prompt: expected one argument (a value that starts with "
                          "'-' is written --flag=VALUE)")),
])
def test_a_mistyped_flag_or_bad_value_is_refused_before_anything_is_sent(capsys, tmp_path, job,
                                                                         typo, message):
    server, flags = job
    assert refused(capsys, [*flags, *typo]) == message
    assert server.stats()["requests"] == 0
    assert not (tmp_path / "out").exists()


def test_every_options_class_flag_is_known_in_both_forms():
    check_flags(["--runner=FnApiRunner", "--direct_num_workers", "2", "--project", "p",
                 "--region=r", "--no_use_public_ips", "--experiments=a", "--flink_master", "x",
                 "--spark_master_url", "y", "--environment_type=LOOPBACK", "--job_port", "1",
                 "--output", "out", "--resume", "--temperature", "-0", "--prompt=-x",
                 "--system_prompt", "- be brief", "--max_concurrency", "64"])


COMMAND_LIST = ("commands: demo, estimate, report, collect; a caption job takes flags only, "
                "see --help)")


@pytest.mark.parametrize("word, message", [
    ("reprt", f"unknown command 'reprt' (did you mean 'report'? {COMMAND_LIST}"),
    ("captoin", f"unknown command 'captoin' ({COMMAND_LIST}"),
    ("dmeo", f"unknown command 'dmeo' (did you mean 'demo'? {COMMAND_LIST}"),
    ("estimat", f"unknown command 'estimat' (did you mean 'estimate'? {COMMAND_LIST}"),
    ("colect", f"unknown command 'colect' (did you mean 'collect'? {COMMAND_LIST}"),
])
def test_a_mistyped_command_is_refused_not_run_as_the_demo(capsys, tmp_path, monkeypatch, word,
                                                           message):
    monkeypatch.chdir(tmp_path)
    assert refused(capsys, [word, "out/", *TEST_RUNNER]) == message
    assert os.listdir(tmp_path) == []


def test_no_input_and_no_api_url_still_runs_the_demo(capsys, tmp_path):
    assert main(["--output", str(tmp_path / "demo"), *TEST_RUNNER]) == 0
    assert "running the demo" in capsys.readouterr().out
    assert len(read_jsonl(str(tmp_path / "demo" / "captions-*.jsonl"))) == 11


def caption_options(tmp_path, flags: dict | None = None, **values) -> CaptionOptions:
    """A job's options that validate_options accepts, changed by ``flags`` (name -> value, or
    a list for a repeated flag) and by ``values`` set as keywords, which argparse never checks."""
    flags = {"input": "a.jsonl", "output": str(tmp_path / "out"),
             "api_url": "http://127.0.0.1:9/v1", "model": "m", **(flags or {})}
    argv = [arg for name, value in flags.items()
            for item in ([value] if isinstance(value, str) else value)
            for arg in (f"--{name}", item)]
    return PipelineOptions(argv, **values).view_as(CaptionOptions)


def test_valid_options_pass(tmp_path):
    validate_options(caption_options(tmp_path))
    validate_options(caption_options(tmp_path, {"output": "gs://bucket/not/checked/here"}))


@pytest.mark.parametrize("flags, values, message", [
    ({"model": ""}, {}, "missing required flag(s): --model"),
    ({"input": ""}, {}, "--input is empty: name a manifest file, glob or URL"),
    ({"input": [" , ", ""]}, {}, "--input is empty: name a manifest file, glob or URL"),
    ({}, {"jpeg_quality": 101}, "--jpeg_quality must be from 1 to 100, got 101"),
    ({}, {"max_concurrency": 0}, "--max_concurrency must be >= 1, got 0"),
    ({"api_key_env": "BEAM_CAPTION_TEST_UNSET"}, {},
     "--api_key_env names BEAM_CAPTION_TEST_UNSET, which is not set or empty"),
    ({"api_key_env": "BEAM_CAPTION_TEST_BLANK"}, {},
     "--api_key_env names BEAM_CAPTION_TEST_BLANK, which is not set or empty"),
])
def test_bad_option_values_are_refused(tmp_path, monkeypatch, flags, values, message):
    monkeypatch.delenv("BEAM_CAPTION_TEST_UNSET", raising=False)
    monkeypatch.setenv("BEAM_CAPTION_TEST_BLANK", " \n")
    with pytest.raises(UsageError) as error:
        validate_options(caption_options(tmp_path, flags, **values))
    assert str(error.value) == message


@pytest.mark.parametrize("settings, message", [
    ({"prompt": "p", "prompts_file": "p.yaml"},
     "give the prompt with --prompt or --prompts_file, not both"),
    ({"prompts_file": "p.yaml", "output_key": "alt"},
     "with --prompts_file each prompt names its output_key; leave out --output_key"),
    ({"api_key_file": "k", "api_key_secret": "projects/p/secrets/s/versions/1"},
     "give the key with one of --api_key_file and --api_key_secret"),
    ({"api_key_secret": "projects/p/secrets/s"},
     "--api_key_secret 'projects/p/secrets/s' is not a secret version name "
     "(projects/PROJECT/secrets/NAME/versions/VERSION, e.g. versions/latest)"),
    ({"max_cost": 5.0}, "--max_cost needs the model's prices: --price_per_million_input_tokens "
                        "and --price_per_million_output_tokens"),
])
def test_contradictions_are_one_check_the_cli_words_with_flags(tmp_path, settings, message):
    """The CLI refuses what CaptionConfig refuses, in the same words, naming flags."""
    with pytest.raises(UsageError) as cli_error:
        validate_options(caption_options(tmp_path, {k: str(v) for k, v in settings.items()}))
    assert str(cli_error.value) == message
    with pytest.raises(UsageError) as library_error:
        CaptionConfig(api_url="http://h/v1", model="m", **settings)
    assert str(library_error.value) == message.replace("--", "")


def test_the_flag_table_takes_config_fields_defaults_from_caption_config(monkeypatch):
    monkeypatch.setattr(CaptionConfig, "flag_defaults",
                        classmethod(lambda cls: {"max_retries": 9, "image_key": "img"}))
    parser = argparse.ArgumentParser()
    flag_table.add_caption_flags(parser)
    parsed = parser.parse_args([])
    assert (parsed.max_retries, parsed.image_key, parsed.num_shards) == (9, "img", 0)
    monkeypatch.setattr(flag_table, "FLAG_GROUPS", (
        ("written twice", lambda group: group.add_argument("--max_retries", default=7)),))
    with pytest.raises(TypeError, match="CaptionConfig.max_retries"):
        flag_table.add_caption_flags(argparse.ArgumentParser())


@pytest.mark.parametrize("output", ["file", "file/sub/dir"])
def test_an_output_that_is_or_lies_under_a_file_is_refused(tmp_path, output):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UsageError, match=f"{tmp_path / 'file'} is a file, not a directory"):
        validate_options(caption_options(tmp_path, {"output": str(tmp_path / output)}))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_a_read_only_output_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(UsageError, match="is not writable"):
        validate_options(caption_options(tmp_path, {"output": str(tmp_path / "ro" / "out")}))


def test_an_output_that_is_a_file_stops_the_cli_before_anything_is_sent(capsys, tmp_path, job):
    server, flags = job
    (tmp_path / "out").write_text("not a directory")
    assert "is a file, not a directory" in refused(capsys, flags)
    assert server.stats()["requests"] == 0


def test_api_key_from_a_mounted_secret_loses_its_newline(monkeypatch):
    monkeypatch.setenv("BEAM_CAPTION_TEST_KEY", "sk-test-123\n")
    assert KeySource("BEAM_CAPTION_TEST_KEY").resolve() == "sk-test-123"
    monkeypatch.setenv("BEAM_CAPTION_TEST_KEY", " \n")
    assert KeySource("BEAM_CAPTION_TEST_KEY").resolve() is None


def test_reported_options_redact_url_credentials_and_queries(tmp_path):
    options = caption_options(tmp_path, {
        "api_url": "https://user:PASSWORD1@gateway.example/v1?api-key=SECRET2",
        "input": ["https://data.example/a.jsonl?sig=SECRET3,gs://bucket/b.jsonl",
                  "s3://AKID:SECRET4@bucket/c.jsonl"],
        "output": "s3://bucket/out?X-Amz-Signature=SECRET5",
        "image_root": "https://img.example/root?token=SECRET6",
        "cache_dir": "https://user:SECRET7@cache.example/answers"})
    reported = reported_options(options)
    text = json.dumps(reported)
    assert not [secret for secret in ("PASSWORD1", "SECRET2", "SECRET3", "SECRET4", "SECRET5",
                                      "SECRET6", "SECRET7") if secret in text], text
    assert reported["api_url"] == "https://REDACTED@gateway.example/v1?REDACTED"
    assert reported["input"] == ["https://data.example/a.jsonl?REDACTED", "gs://bucket/b.jsonl",
                                 "s3://REDACTED@bucket/c.jsonl"]
    assert reported["model"] == "m"


def start_job(data, server, out) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "beam_caption", *TEST_RUNNER, "--input", data.manifests[0],
         "--api_url", server.url, "--model", "fake-vlm", "--image_root", str(data.root),
         "--max_concurrency", "4", "--checkpoint_interval", "0.2", "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpointed(out) -> list[dict]:
    return read_jsonl(str(out / ".checkpoint" / "*.jsonl"))


def test_sigterm_checkpoints_and_exits_130_like_ctrl_c(dataset_factory, tmp_path):
    data = dataset_factory(60, files=1)
    out = tmp_path / "out"
    with FakeVLMServer(FakeVLMConfig(latency_ms=300)) as server:
        process = start_job(data, server, out)
        deadline = time.monotonic() + 120
        while len(checkpointed(out)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr.strip()) == (130, INTERRUPTED)
    assert 4 <= len(checkpointed(out)) < 60
    assert stdout == ""


def test_ctrl_c_while_beam_is_imported_prints_one_line(dataset_factory, tmp_path):
    data = dataset_factory(20, files=1)
    with FakeVLMServer(FakeVLMConfig(latency_ms=300)) as server:
        process = start_job(data, server, tmp_path / "out")
        time.sleep(1)  # Beam's import takes seconds; a job still running would end the same
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr.strip()) == (130, INTERRUPTED)


def test_verbose_shows_the_packages_debug_lines(tmp_path):
    data = make_dataset(tmp_path / "data", 2, files=1, bad_records=True)
    flags = [*TEST_RUNNER, "--input", data.manifests[0], "--image_root", str(data.root)]
    with FakeVLMServer() as server:
        flags += ["--api_url", server.url, "--model", "fake-vlm"]
        quiet = run_cli(flags, tmp_path / "a", timeout=120)
        verbose = run_cli([*flags, "-v"], tmp_path / "b", timeout=120)
    assert quiet.returncode == verbose.returncode == 0, verbose.stderr[-2000:]
    assert "DEBUG beam_caption" not in quiet.stderr
    assert "DEBUG beam_caption.transforms.caption" in verbose.stderr
    assert "image_not_found" in verbose.stderr
