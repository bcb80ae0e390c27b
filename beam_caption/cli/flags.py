"""CaptionOptions: every beam_caption flag, typed, beside Beam's own options."""

from __future__ import annotations

import argparse
import dataclasses
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

from beam_caption import DEFAULT_SYSTEM_PROMPT
from beam_caption.core.api_keys import SECRET_VERSION
from beam_caption.core.errors import UsageError
from beam_caption.core.redact import clean_key, redact_url
from beam_caption.core.tokens import DETAILS, FORMULAS, default_max_side

OUTPUT_FORMATS = ("jsonl", "json", "parquet")


@dataclasses.dataclass(frozen=True)
class _Range:
    """An argparse type: a number of ``kind`` from ``low`` (excluded when ``above``) to ``high``.

    ``validate_options`` checks the same range on values set without argparse (keyword options).
    """

    kind: type
    low: float
    high: float | None = None
    above: bool = False

    def __call__(self, text: str) -> float:
        try:
            value = self.kind(text)
        except ValueError:
            noun = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None. NaN is out of every range."""
        too_low = not (value > self.low if self.above else value >= self.low)
        if too_low or (self.high is not None and not value <= self.high):
            return f"must be {self._bounds()}, got {value}"
        return None

    def _bounds(self) -> str:
        if self.high is not None:
            return f"from {self.low} to {self.high}"
        return f"{'>' if self.above else '>='} {self.low}"


_POSITIVE_INT = _Range(int, 1)
_NON_NEGATIVE_INT = _Range(int, 0)
_POSITIVE_FLOAT = _Range(float, 0, above=True)


class CaptionOptions(PipelineOptions):
    """Flags of ``python -m beam_caption`` (see the CLI contract in the README)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        io = parser.add_argument_group("input and output")
        io.add_argument("--input", action="append", default=None,
                        help="Manifest path, glob or URL (JSON array or JSONL, .gz ok). "
                             "Repeat the flag or give a comma-separated list.")
        io.add_argument("--output", default=None,
                        help="Output directory (local path or URL such as gs://bucket/run1).")
        io.add_argument("--image_root", default=None,
                        help="Base for relative image paths (default: the launcher's current "
                             "directory).")
        io.add_argument("--image_key", default="image",
                        help="Record field holding the image path or list of paths.")
        io.add_argument("--conversation_key", default="conversation",
                        help="Record field holding the conversation turns.")
        io.add_argument("--output_key", default="caption",
                        help="Field the caption is written to.")
        io.add_argument("--num_shards", type=_NON_NEGATIVE_INT, default=0,
                        help="Output shards per file set (0 = the runner decides).")
        io.add_argument("--output_format", default="jsonl", choices=OUTPUT_FORMATS,
                        help="Captions and failures as JSON lines (default), a JSON array per "
                             "shard, or Parquet (needs pyarrow; a fixed schema, each record "
                             "as JSON in a column).")
        io.add_argument("--output_compression", default="none", choices=("none", "gzip"),
                        help="Compress the jsonl and json outputs (files end in .gz).")
        io.add_argument("--report", action="store_true", default=False,
                        help="After the job, write report.html into --output (see 'python -m "
                             "beam_caption report').")
        io.add_argument("--no_progress", action="store_true", default=False,
                        help="No live progress line on a local run.")
        io.add_argument("--resume", action="store_true", default=False,
                        help="Keep the captions already in --output (final or checkpointed) and "
                             "caption only the other records; earlier failures are retried.")
        io.add_argument("--overwrite", action="store_true", default=False,
                        help="Delete earlier outputs in --output before running (without "
                             "--resume or --overwrite, a non-empty --output is refused).")
        io.add_argument("--checkpoint_interval", type=_POSITIVE_FLOAT, default=10.0,
                        help="Seconds between checkpoint writes of finished captions, which "
                             "--resume reuses after a crash or Ctrl-C.")

        api = parser.add_argument_group("model endpoint")
        api.add_argument("--api_url", default=None,
                         help="OpenAI-compatible base URL ending in /v1, e.g. "
                              "https://api.openai.com/v1 or http://localhost:8000/v1.")
        api.add_argument("--model", default=None, help="Model name sent in each request.")
        api.add_argument("--api_key_env", default=None,
                         help="Environment variable holding the API key (default: DF_API_KEY, "
                              "then OPENAI_API_KEY). The key itself is never a flag.")
        api.add_argument("--api_key_file", default=None,
                         help="File holding the API key, read by every worker (a path or fsspec "
                              "URL the workers can read, e.g. a mounted Kubernetes secret); "
                              "used instead of the environment variables.")
        api.add_argument("--api_key_secret", default=None,
                         help="GCP Secret Manager version holding the API key "
                              "(projects/P/secrets/S/versions/V), read by every worker with its "
                              "service account (needs the gcp extra); used instead of the "
                              "environment variables.")
        api.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
                         help="System prompt sent first in every request ('' sends none).")
        api.add_argument("--prompt", default=None,
                         help="User prompt for every image; by default the record's human turns "
                              "from --conversation_key are used.")
        api.add_argument("--prompts_file", default=None,
                         help="YAML or JSON file of several prompts asked of every image (name "
                              "-> prompt with {field} placeholders, system, output_key, "
                              "max_tokens, temperature, schema or response_format); each "
                              "answer goes under its own key. Read at launch.")
        api.add_argument("--max_tokens", type=_POSITIVE_INT, default=None,
                         help="Upper bound on caption tokens per request (default: server's).")
        api.add_argument("--temperature", type=_Range(float, 0), default=None,
                         help="Sampling temperature (default: server's). A model that refuses "
                              "it (reasoning models) runs without it, with one warning.")
        api.add_argument("--reasoning_effort", default=None,
                         choices=("minimal", "low", "medium", "high"),
                         help="Reasoning effort for reasoning models (gpt-5, o-series); "
                              "captioning rarely needs more than minimal.")

        batch = parser.add_argument_group("batch mode (OpenAI-style Batch API)")
        batch.add_argument("--mode", default="online", choices=("online", "batch"),
                           help="online: one request per record and prompt, answered at once; "
                                "batch: submitted as Batch API batches (about half the price, "
                                "answered within 24 h), recorded in --output/batches/, polled "
                                "by the launcher, then collected into the same outputs.")
        batch.add_argument("--batch_max_requests", type=_POSITIVE_INT, default=50_000,
                           help="Requests per batch input file (the provider's limit).")
        batch.add_argument("--batch_max_bytes", type=_POSITIVE_INT, default=200_000_000,
                           help="Bytes per batch input file (images make them large).")
        batch.add_argument("--batch_poll_interval", type=_Range(float, 0, 86_400, above=True),
                           default=60.0,
                           help="Longest wait between two polls of the batches (the first "
                                "ones come sooner).")
        batch.add_argument("--batch_max_wait_hours", type=_Range(float, 0, 720, above=True),
                           default=26.0,
                           help="A batch not ended this long after its upload (the API's 24 h "
                                "window plus a margin) is given up: its unanswered requests "
                                "fail as batch_timeout, what it answered is collected.")
        batch.add_argument("--batch_max_result_bytes", type=_POSITIVE_INT,
                           default=2_000_000_000,
                           help="Bytes read of one result file (streamed to a temporary file); "
                                "requests past them fail as batch_result_too_large.")
        batch.add_argument("--batch_discount", type=_Range(float, 0, 1), default=0.5,
                           help="Batch price as a share of the --price_per_million_* prices, "
                                "for --max_cost and the summary's cost.")
        batch.add_argument("--retry_failed", action="store_true", default=False,
                           help="Submit once more the records the batches left unanswered "
                                "(error lines, expired or failed batches) before collecting "
                                "(--resume does too).")
        batch.add_argument("--fallback", default="none", choices=("none", "online"),
                           help="online: caption what the batches could not through the "
                                "online path when collecting, instead of recording failures.")

        calls = parser.add_argument_group("requests")
        calls.add_argument("--max_concurrency", type=_POSITIVE_INT, default=32,
                           help="Requests in flight per worker process.")
        calls.add_argument("--request_timeout", type=_POSITIVE_FLOAT, default=120.0,
                           help="Seconds per attempt.")
        calls.add_argument("--max_retries", type=_NON_NEGATIVE_INT, default=6,
                           help="Attempts after the first for retryable errors.")
        calls.add_argument("--max_backoff", type=_POSITIVE_FLOAT, default=60.0,
                           help="Longest wait of our own backoff between two attempts.")
        calls.add_argument("--max_retry_wait", type=_POSITIVE_FLOAT, default=300.0,
                           help="Longest wait taken from a server (Retry-After, retry-after-ms, "
                                "x-ratelimit-* headers): a Retry-After asking for longer gets "
                                "the record failed as request/throttled, never retried early; "
                                "a rate-limit header asking for longer is ignored.")
        calls.add_argument("--max_response_bytes", type=_POSITIVE_INT, default=4 * 2**20,
                           help="Larger response bodies fail the record (response_too_large).")
        calls.add_argument("--max_caption_chars", type=_POSITIVE_INT, default=32_000,
                           help="Longer captions fail the record (caption_too_long).")
        calls.add_argument("--max_bytes_in_flight", type=_POSITIVE_INT, default=256 * 2**20,
                           help="Image bytes (source files, then request bodies) held by the "
                                "records in flight per worker process; bounds memory at any "
                                "concurrency.")
        calls.add_argument("--max_requests_per_minute", type=_POSITIVE_FLOAT, default=None,
                           help="Requests per minute for the whole job, all worker processes "
                                "together (retries included), e.g. the account's RPM. Answers' "
                                "x-ratelimit-* headers are honoured without it.")
        calls.add_argument("--max_tokens_per_minute", type=_POSITIVE_FLOAT, default=None,
                           help="Tokens per minute for the whole job (the account's TPM), "
                                "counted before sending: text, images as sent and --max_tokens.")
        calls.add_argument("--max_cost", type=_POSITIVE_FLOAT, default=None,
                           help="Budget in dollars for the whole job, at the --price_per_million_"
                                "* prices from the answers' usage: once spent, no new request "
                                "starts and the job stops; --resume continues.")
        calls.add_argument("--price_per_million_input_tokens", type=_Range(float, 0),
                           default=0.0, help="Dollars per million prompt tokens (for --max_cost "
                                             "and the summary's cost).")
        calls.add_argument("--price_per_million_output_tokens", type=_Range(float, 0),
                           default=0.0, help="Dollars per million completion tokens.")
        calls.add_argument("--worker_processes", type=_POSITIVE_INT, default=None,
                           help="How many worker processes share the job's per-minute limits "
                                "(default: from the runner's options where they say; needed "
                                "with a limit on Flink, Spark or Portable runners).")
        calls.add_argument("--cache_dir", default=None,
                           help="Directory or URL (any fsspec filesystem) where answers are "
                                "stored by request content; later runs reuse them instead of "
                                "paying again. Duplicates within a run are always sent once.")
        calls.add_argument("--skip_preflight", action="store_true", default=False,
                           help="Do not check endpoint, key and model before the job starts.")

        images = parser.add_argument_group("images")
        images.add_argument("--max_image_side", type=_NON_NEGATIVE_INT, default=None,
                            help="Longest side sent to the model in pixels (0 keeps the size; "
                                 "default 1024, or 512 with --image_detail low, where OpenAI "
                                 "shrinks images to 512 itself).")
        images.add_argument("--max_image_bytes", type=_POSITIVE_INT, default=50 * 2**20,
                            help="Refuse source images larger than this many bytes.")
        images.add_argument("--jpeg_quality", type=_Range(int, 1, 100), default=85,
                            help="JPEG quality of the re-encoded images.")
        images.add_argument("--image_timeout", type=_POSITIVE_FLOAT, default=60.0,
                            help="Seconds to read one record's images (connect and total).")
        images.add_argument("--image_detail", default=None, choices=DETAILS,
                            help="OpenAI's image detail sent with every image: low (85 tokens "
                                 "an image, whatever its size), high or auto (default: not "
                                 "sent, the server's choice).")
        images.add_argument("--token_formula", default="openai", choices=FORMULAS,
                            help="How image tokens are counted for --max_tokens_per_minute and "
                                 "estimates: openai (512-px tiles) or qwen (28-px patches).")
        images.add_argument("--image_retries", type=_NON_NEGATIVE_INT, default=3,
                            help="Reads after the first for transient image failures (HTTP 5xx "
                                 "and 429, resets, timeouts, storage errors), with backoff.")
        images.add_argument("--allow_private_urls", action="store_true", default=False,
                            help="Fetch http(s) image URLs that resolve to loopback, private, "
                                 "link-local or other non-public addresses (refused by "
                                 "default: a manifest could make workers fetch internal "
                                 "services such as a cloud metadata server).")


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
    CaptionOptions._add_argparse_args(parser)
    return parser


def validate_options(options: CaptionOptions) -> None:
    """Raise UsageError, before anything is read or sent, for options a job cannot run with."""
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
    if options.max_cost and not (options.price_per_million_input_tokens or
                                 options.price_per_million_output_tokens):
        raise UsageError("--max_cost needs the model's prices: --price_per_million_input_tokens "
                         "and --price_per_million_output_tokens")
    if options.mode == "online" and (options.retry_failed or options.fallback != "none"):
        raise UsageError("--retry_failed and --fallback are for --mode batch")
    if options.mode == "batch" and options.max_cost and not options.max_tokens:
        raise UsageError("--max_cost in batch mode needs --max_tokens: a batch's cost is "
                         "capped before any answer comes, by the longest answer it allows")
    if options.prompts_file and options.prompt:
        raise UsageError("give the prompt with --prompt or --prompts_file, not both")
    if options.prompts_file and options.output_key != "caption":
        raise UsageError("with --prompts_file each prompt names its output_key; leave out "
                         "--output_key")
    if options.output_format == "parquet" and _missing_module("pyarrow"):
        raise UsageError("--output_format parquet needs the parquet extra: pip install "
                         "'beam_caption[parquet]'")
    if options.output_format == "parquet" and options.output_compression != "none":
        raise UsageError("Parquet files are compressed inside (snappy); --output_compression is "
                         "for jsonl and json")
    if options.api_key_file and options.api_key_secret:
        raise UsageError("give the key with one of --api_key_file and --api_key_secret")
    if options.api_key_secret and not SECRET_VERSION.fullmatch(options.api_key_secret):
        raise UsageError(f"--api_key_secret {options.api_key_secret!r} is not a secret version "
                         "name (projects/PROJECT/secrets/NAME/versions/VERSION, e.g. "
                         "versions/latest)")
    _check_locations(options)
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
        if not isinstance(action.type, _Range):
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


def split_inputs(inputs: list[str] | None) -> list[str]:
    """``--input`` values, repeated and/or comma-separated, as one flat list."""
    return [part.strip() for value in inputs or () for part in value.split(",") if part.strip()]
