"""CaptionOptions: every beam_caption flag, typed, beside Beam's own options."""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
from typing import Any

# _BeamArgumentParser: the parser class Beam's options expect (add_value_provider_argument).
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
    _BeamArgumentParser,
)

from beam_caption.cli.flag_table import NumberRange, add_caption_flags, split_inputs
from beam_caption.core.errors import UsageError
from beam_caption.core.prompts import load_prompts_file
from beam_caption.core.redact import clean_key, redact_url
from beam_caption.core.settings import check_settings
from beam_caption.core.stages import batch_refusal
from beam_caption.core.tokens import default_max_side
from beam_caption.transforms.library import webdataset_problem


class CaptionOptions(PipelineOptions):
    """Flags of ``python -m beam_caption`` (the table: flag_table.py; the CLI contract: the
    README)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_caption_flags(parser)


BEAM_OPTIONS_REPORTED = ("runner", "direct_running_mode", "direct_num_workers", "project",
                         "region", "job_name", "num_workers", "max_num_workers",
                         "temp_location", "staging_location")
REQUIRED_FLAGS = ("input", "output", "api_url", "model")
# Local paths workers use: made absolute at launch, as workers run in other directories.
LOCAL_PATH_FLAGS = ("output", "image_root", "cache_dir", "api_key_file")
# The local runner when none is named: Beam's DirectRunner would first try to download the
# Prism runner from the internet; the Python FnApiRunner is what the tests run.
LOCAL_RUNNER = "FnApiRunner"
_LOCAL_RUNNERS = (LOCAL_RUNNER, "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner")
# Schemes each kind of location flag takes ("" is a local path).
READ_SCHEMES = ("", "gs", "gcs", "s3", "http", "https")
WRITE_SCHEMES = ("", "gs", "s3")
# Options that name a place; a URL there can carry credentials or a signed query.
_LOCATION_OPTIONS = ("api_url", "output", "image_root", "cache_dir", "api_key_file",
                     "temp_location", "staging_location")


class _FlagParser(_BeamArgumentParser):
    """Beam's own parser class (it has add_value_provider_argument), raising UsageError
    instead of printing the usage of every Beam flag and exiting."""

    def error(self, message: str):
        if message.startswith("the following arguments are required"):
            return  # a required flag is checked by whoever defines it, not a typo
        if message.endswith("expected one argument"):
            message += " (a value that starts with '-' is written --flag=VALUE)"
        raise UsageError(message)


def _subclasses(cls: type) -> list[type]:
    """Every subclass of ``cls``, at any depth."""
    children: list[type] = cls.__subclasses__()
    return [sub for child in children for sub in (child, *_subclasses(child))]


def _every_flag_parser() -> _FlagParser:
    """A parser of every flag that some PipelineOptions subclass defines (Beam's, ours)."""
    parser = _FlagParser(allow_abbrev=False, add_help=False, conflict_handler="resolve")
    for options_class in _subclasses(PipelineOptions):
        options_class._add_argparse_args(parser)  # type: ignore[attr-defined]
    return parser


def check_flags(argv: list[str]) -> None:
    """Raise UsageError for what Beam would only warn about and drop: a flag no options class
    defines (a typo), a stray argument, or a flag value of the wrong type or range."""
    parser = _every_flag_parser()
    _, unknown = parser.parse_known_args(argv)
    if not unknown:
        return
    if not unknown[0].startswith("-"):
        raise UsageError(f"unexpected argument {unknown[0]!r} (a flag takes one value: repeat "
                         "--input or join manifests with commas)")
    flag = unknown[0].split("=", 1)[0]
    known = [name for action in parser._actions for name in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1)
    raise UsageError(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))


def _caption_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    add_caption_flags(parser)
    return parser


def validate_options(options: CaptionOptions) -> None:
    """Raise UsageError, before anything is read or sent, for options a job cannot run with:
    what is about flags and the launch, and the captioning settings as CaptionConfig checks
    them (core/settings.check_settings, its messages naming flags)."""
    missing = [f"--{name}" for name in REQUIRED_FLAGS if not getattr(options, name)]
    if missing:
        raise UsageError("missing required flag(s): " + ", ".join(missing))
    if not split_inputs(options.input):
        raise UsageError("--input is empty: name a manifest file, glob or URL")
    out_of_range = _out_of_range(options)
    if out_of_range:
        raise UsageError(out_of_range)
    if options.api_key_env and not clean_key(os.environ.get(options.api_key_env)):
        raise UsageError(f"--api_key_env names {options.api_key_env}, which is not set or empty")
    check_settings(options, name=lambda setting: f"--{setting}")
    if options.mode == "online" and (options.retry_failed or options.fallback != "none"):
        raise UsageError("--retry_failed and --fallback are for --mode batch")
    if options.mode == "batch" and options.max_cost and not options.max_tokens:
        raise UsageError("--max_cost in batch mode needs --max_tokens: a batch's cost is "
                         "capped before any answer comes, by the longest answer it allows")
    if options.output_format == "parquet" and _missing_module("pyarrow"):
        raise UsageError("--output_format parquet needs the parquet extra: pip install "
                         "'beam_caption[parquet]'")
    if options.output_format == "parquet" and options.output_compression != "none":
        raise UsageError("Parquet files are compressed inside (snappy); --output_compression is "
                         "for jsonl and json")
    problem = webdataset_problem(options.output_format, options.output_compression,
                                 options.copy_images)
    if problem:
        raise UsageError(problem)
    if options.copy_images and options.mode == "batch":
        raise UsageError("--copy_images carries the image bytes the online requests read: "
                         "not with --mode batch")
    _check_locations(options)
    if options.mode == "batch" and options.prompts_file:  # stages wait for answers
        refusal = batch_refusal(load_prompts_file(options.prompts_file))
        if refusal:
            raise UsageError(refusal)
    _check_output_dir(options.output)


def prepare_launch(options: PipelineOptions) -> None:
    """Settings that must be fixed on the launcher, before the options reach any worker: local
    path flags made absolute (a worker resolves a relative one in its own directory), the
    default --max_image_side for the token formula and detail, the offline local runner when
    no --runner is named, and the number of worker processes that share the job's rate
    limits."""
    flags = options.view_as(CaptionOptions)
    for name in LOCAL_PATH_FLAGS:
        value = getattr(flags, name)
        if value and "://" not in value:
            setattr(flags, name, os.path.abspath(os.path.expanduser(value)))
    if flags.max_image_side is None:
        flags.max_image_side = default_max_side(flags.token_formula, flags.image_detail)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = LOCAL_RUNNER
    if flags.worker_processes is None:
        flags.worker_processes = count_worker_processes(options)
        if flags.worker_processes is None and (flags.max_requests_per_minute or
                                               flags.max_tokens_per_minute or flags.max_cost):
            raise UsageError(
                f"--max_requests_per_minute, --max_tokens_per_minute and --max_cost are for "
                f"the whole job: "
                f"with --runner {standard.runner}, say how many worker processes share them "
                f"with --worker_processes (workers x SDK processes per worker)")


def is_local_runner(options: PipelineOptions) -> bool:
    """Whether the job runs in this process (the default, or a DirectRunner named)."""
    runner = options.view_as(StandardOptions).runner or LOCAL_RUNNER
    return isinstance(runner, str) and runner.split(".")[-1] in _LOCAL_RUNNERS


def count_worker_processes(options: PipelineOptions) -> int | None:
    """How many worker processes a job runs with, where the runner's options say: 1 for the
    local runner (more with --direct_running_mode multi_processing), and on Dataflow the
    most workers times a process per vCPU of --worker_machine_type. None when unknown."""
    runner = options.view_as(StandardOptions).runner
    if is_local_runner(options):
        direct = options.view_as(DirectOptions)
        if direct.direct_running_mode != "multi_processing":
            return 1
        return direct.direct_num_workers or os.cpu_count() or 1
    if runner != "DataflowRunner":
        return None
    workers = options.view_as(WorkerOptions)
    count = workers.max_num_workers or workers.num_workers
    if not count:
        return None
    if "no_use_multiple_sdk_containers" in (options.view_as(DebugOptions).experiments or ()):
        return count
    vcpus = re.search(r"-(\d+)$", workers.machine_type or "n1-standard-1")
    return count * (int(vcpus.group(1)) if vcpus else 1)


def _out_of_range(options: CaptionOptions) -> str | None:
    """The first numeric option out of its range (possible when set by keyword), or None."""
    for action in _caption_parser()._actions:
        if not isinstance(action.type, NumberRange):
            continue
        value = getattr(options, action.dest)
        problem = value is not None and action.type.problem(value)
        if problem:
            return f"--{action.dest} {problem}"
    return None


def _check_locations(options: CaptionOptions) -> None:
    """Refuse at launch a location flag whose scheme the job cannot use, or whose storage
    package is not installed, rather than fail on the workers: reads take local paths, gs://,
    s3:// and http(s)://; writes (--output, --cache_dir) local paths, gs:// and s3://."""
    reads = [("--input", value) for value in split_inputs(options.input)]
    reads += [(flag, value) for flag, value in (("--image_root", options.image_root),
                                                ("--api_key_file", options.api_key_file),
                                                ("--prompts_file", options.prompts_file))
              if value]
    writes = [(flag, value) for flag, value in (("--output", options.output),
                                                ("--cache_dir", options.cache_dir)) if value]
    for flags, schemes in ((reads, READ_SCHEMES), (writes, WRITE_SCHEMES)):
        for flag, value in flags:
            scheme = value.partition("://")[0].lower() if "://" in value else ""
            if scheme not in schemes:
                accepted = ", ".join(f"{s}://" for s in schemes if s)
                raise UsageError(f"{flag} {redact_url(value)}: {scheme}:// is not supported "
                                 f"here; use a local path or {accepted}")
            missing = _missing_package(scheme, write=flags is writes and flag == "--output")
            if missing:
                raise UsageError(f"{flag} {redact_url(value)} needs {missing}")


def _missing_package(scheme: str, write: bool) -> str | None:
    """What to install for ``scheme`` (reads through fsspec; --output through Beam's own
    filesystems), or None when it is there."""
    if scheme == "s3":
        modules = ["s3fs"] + (["boto3"] if write else [])
        if any(map(_missing_module, modules)):
            return "the s3 extra: pip install 'beam_caption[s3]'"
    return None


def _missing_module(name: str) -> bool:
    return importlib.util.find_spec(name) is None


def _check_output_dir(output: str) -> None:
    """Refuse a local --output that is a file or cannot be created or written (URLs pass)."""
    if "://" in output:
        return
    existing = os.path.abspath(output)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output {output}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: {existing} is not writable")


def reported_options(options: PipelineOptions) -> dict:
    """The options a summary shows: every beam_caption flag and the main Beam ones.

    Holds no secret: the API key is never an option, only the name of its variable, and URL
    credentials and queries are redacted.
    """
    names = [*vars(_caption_parser().parse_args([])), *BEAM_OPTIONS_REPORTED]
    values = options.get_all_options(drop_default=False)
    reported: dict[str, Any] = {name: values.get(name) for name in names}
    for name in _LOCATION_OPTIONS:
        reported[name] = reported[name] and redact_url(reported[name])
    reported["input"] = [redact_url(path) for path in split_inputs(reported["input"])]
    return reported
