"""The flags of ``python -m beam_caption``, declared once as argparse argument groups (the
groups ``--help`` shows), without Beam.

A flag that is a ``CaptionConfig`` field (core/settings.py) takes that field's default: the
table writes defaults only for the flags about the launch and the outputs. ``CaptionOptions``
(flags.py) adds every group to Beam's option parser; ``estimate`` adds the flags it shares with
a job to its own parser, so it starts without importing Beam.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection
from typing import Any, Protocol

from beam_caption.core.settings import CaptionConfig
from beam_caption.core.tokens import DETAILS, FORMULAS

OUTPUT_FORMATS = ("jsonl", "json", "parquet", "webdataset")


@dataclasses.dataclass(frozen=True)
class NumberRange:
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


POSITIVE_INT = NumberRange(int, 1)
NON_NEGATIVE_INT = NumberRange(int, 0)
POSITIVE_FLOAT = NumberRange(float, 0, above=True)
SHARE = NumberRange(float, 0, 1)


class FlagGroup(Protocol):
    """What a flag group function adds its flags to: an argparse argument group."""

    def add_argument(self, *names: str, **settings: Any) -> Any: ...


def _input_output_flags(io: FlagGroup) -> None:
    """Where records come from and outputs go, and how the run treats an output directory."""
    io.add_argument("--input", action="append", default=None,
                    help="Manifest path, glob or URL (JSON array or JSONL, .gz ok). "
                         "Repeat the flag or give a comma-separated list.")
    io.add_argument("--output", default=None,
                    help="Output directory (local path or URL such as gs://bucket/run1).")
    io.add_argument("--image_root",
                    help="Base for relative image paths (default: the launcher's current "
                         "directory).")
    io.add_argument("--image_key",
                    help="Record field holding the image path or list of paths.")
    io.add_argument("--conversation_key",
                    help="Record field holding the conversation turns.")
    io.add_argument("--output_key",
                    help="Field the caption is written to.")
    io.add_argument("--num_shards", type=NON_NEGATIVE_INT, default=0,
                    help="Output shards per file set (0 = the runner decides).")
    io.add_argument("--output_format", default="jsonl", choices=OUTPUT_FORMATS,
                    help="Captions and failures as JSON lines (default), a JSON array per "
                         "shard, or Parquet (needs pyarrow; a fixed schema, each record "
                         "as JSON in a column); webdataset: captions as tar shards of "
                         "KEY.json and KEY.txt samples (failures as JSON lines).")
    io.add_argument("--copy_images", action="store_true", default=False,
                    help="With --output_format webdataset, put each caption's image into its "
                         "sample too (KEY.jpg, .png...), so a training loader reads the "
                         "captioned set directly.")
    io.add_argument("--output_compression", default="none", choices=("none", "gzip"),
                    help="Compress the jsonl and json outputs (files end in .gz).")
    io.add_argument("--report", action="store_true", default=False,
                    help="After the job, write report.html into --output (see 'python -m "
                         "beam_caption report').")
    io.add_argument("--max_failure_rate", type=SHARE, default=None,
                    help="Exit with status 3, after writing every output, when more than "
                         "this share of the records failed (0 to 1, e.g. 0.05; 0: any "
                         "failure). Without it a run with failed records exits 0.")
    io.add_argument("--no_progress", action="store_true", default=False,
                    help="No live progress line on a local run.")
    io.add_argument("--resume", action="store_true", default=False,
                    help="Keep the captions already in --output (final or checkpointed) and "
                         "caption only the other records; earlier failures are retried.")
    io.add_argument("--overwrite", action="store_true", default=False,
                    help="Delete earlier outputs in --output before running (without "
                         "--resume or --overwrite, a non-empty --output is refused).")
    io.add_argument("--checkpoint_interval", type=POSITIVE_FLOAT, default=10.0,
                    help="Seconds between checkpoint writes of finished captions, which "
                         "--resume reuses after a crash or Ctrl-C.")


def _endpoint_flags(api: FlagGroup) -> None:
    """The model, its key and what is asked of it."""
    api.add_argument("--api_url",
                     help="OpenAI-compatible base URL ending in /v1, e.g. "
                          "https://api.openai.com/v1 or http://localhost:8000/v1.")
    api.add_argument("--model", help="Model name sent in each request.")
    api.add_argument("--api_key_env",
                     help="Environment variable holding the API key (default: DF_API_KEY, "
                          "then OPENAI_API_KEY). The key itself is never a flag.")
    api.add_argument("--api_key_file",
                     help="File holding the API key, read by every worker (a path or fsspec "
                          "URL the workers can read, e.g. a mounted Kubernetes secret); "
                          "used instead of the environment variables.")
    api.add_argument("--api_key_secret",
                     help="GCP Secret Manager version holding the API key "
                          "(projects/P/secrets/S/versions/V), read by every worker with its "
                          "service account (needs the gcp extra); used instead of the "
                          "environment variables.")
    api.add_argument("--system_prompt",
                     help="System prompt sent first in every request ('' sends none).")
    api.add_argument("--prompt",
                     help="User prompt for every image; by default the record's human turns "
                          "from --conversation_key are used.")
    api.add_argument("--prompts_file",
                     help="YAML or JSON file of several prompts asked of every image (name "
                          "-> prompt with {field} placeholders, system, output_key, "
                          "max_tokens, temperature, schema or response_format); each "
                          "answer goes under its own key. Read at launch.")
    api.add_argument("--max_tokens", type=POSITIVE_INT,
                     help="Upper bound on caption tokens per request (default: server's).")
    api.add_argument("--temperature", type=NumberRange(float, 0),
                     help="Sampling temperature (default: server's). A model that refuses "
                          "it (reasoning models) runs without it, with one warning.")
    api.add_argument("--reasoning_effort", choices=("minimal", "low", "medium", "high"),
                     help="Reasoning effort for reasoning models (gpt-5, o-series); "
                          "captioning rarely needs more than minimal.")


def _batch_flags(batch: FlagGroup) -> None:
    """--mode batch: batch files, polling, waiting and collecting."""
    batch.add_argument("--mode", default="online", choices=("online", "batch"),
                       help="online: one request per record and prompt, answered at once; "
                            "batch: submitted as Batch API batches (about half the price, "
                            "answered within 24 h), recorded in --output/batches/, polled "
                            "by the launcher, then collected into the same outputs.")
    batch.add_argument("--batch_max_requests", type=POSITIVE_INT, default=50_000,
                       help="Requests per batch input file (the provider's limit).")
    batch.add_argument("--batch_max_bytes", type=POSITIVE_INT, default=200_000_000,
                       help="Bytes per batch input file (images make them large).")
    batch.add_argument("--batch_poll_interval", type=NumberRange(float, 0, 86_400, above=True),
                       default=60.0,
                       help="Longest wait between two polls of the batches (the first "
                            "ones come sooner).")
    batch.add_argument("--batch_max_wait_hours", type=NumberRange(float, 0, 720, above=True),
                       default=26.0,
                       help="A batch not ended this long after its upload (the API's 24 h "
                            "window plus a margin) is given up: its unanswered requests "
                            "fail as batch_timeout, what it answered is collected.")
    batch.add_argument("--batch_max_result_bytes", type=POSITIVE_INT,
                       default=2_000_000_000,
                       help="Bytes read of one result file (streamed to a temporary file); "
                            "requests past them fail as batch_result_too_large.")
    batch.add_argument("--batch_discount", type=SHARE,
                       help="Batch price as a share of the --price_per_million_* prices, "
                            "for --max_cost and the summary's cost.")
    batch.add_argument("--retry_failed", action="store_true", default=False,
                       help="Submit once more the records the batches left unanswered "
                            "(error lines, expired or failed batches) before collecting "
                            "(--resume does too).")
    batch.add_argument("--fallback", default="none", choices=("none", "online"),
                       help="online: caption what the batches could not through the "
                            "online path when collecting, instead of recording failures.")


def _request_flags(calls: FlagGroup) -> None:
    """How requests are sent: concurrency, retries, ceilings, job-wide limits, cost, cache."""
    calls.add_argument("--max_concurrency", type=POSITIVE_INT,
                       help="Requests in flight per worker process.")
    calls.add_argument("--request_timeout", type=POSITIVE_FLOAT,
                       help="Seconds per attempt.")
    calls.add_argument("--max_retries", type=NON_NEGATIVE_INT,
                       help="Attempts after the first for retryable errors.")
    calls.add_argument("--max_backoff", type=POSITIVE_FLOAT,
                       help="Longest wait of our own backoff between two attempts.")
    calls.add_argument("--max_retry_wait", type=POSITIVE_FLOAT,
                       help="Longest wait taken from a server (Retry-After, retry-after-ms, "
                            "x-ratelimit-* headers): a Retry-After asking for longer gets "
                            "the record failed as request/throttled, never retried early; "
                            "a rate-limit header asking for longer is ignored.")
    calls.add_argument("--max_response_bytes", type=POSITIVE_INT,
                       help="Larger response bodies fail the record (response_too_large).")
    calls.add_argument("--max_caption_chars", type=POSITIVE_INT,
                       help="Longer captions fail the record (caption_too_long).")
    calls.add_argument("--answer_checks",
                       help="Checks a text answer must pass to be kept, comma-separated: "
                            "repetition (a loop: response/degenerate), refusal (a refusal "
                            "written as the answer: response/refusal), short (under "
                            "--min_caption_chars: response/too_short); none turns them off. "
                            "A failed check is retried with a new seed, then fails the "
                            "record. Answers with a JSON schema are checked by it instead.")
    calls.add_argument("--min_caption_chars", type=NON_NEGATIVE_INT,
                       help="With the short check, answers with fewer characters fail "
                            "(0: none; prompts that may rightly answer '3' or 'No' need 0).")
    calls.add_argument("--refusal_phrases_file",
                       help="UTF-8 file of refusal phrases, one a line (# comments), that "
                            "replaces the built-in list (English, Chinese, Japanese, Korean, "
                            "Spanish, French, German, Portuguese, Italian, Russian): an "
                            "answer starting with one fails the refusal check, compared "
                            "without case, punctuation or apostrophe differences. Read at "
                            "launch.")
    calls.add_argument("--max_bytes_in_flight", type=POSITIVE_INT,
                       help="Image bytes (source files, then request bodies) held by the "
                            "records in flight per worker process; bounds memory at any "
                            "concurrency.")
    calls.add_argument("--max_requests_per_minute", type=POSITIVE_FLOAT,
                       help="Requests per minute for the whole job, all worker processes "
                            "together (retries included), e.g. the account's RPM. Answers' "
                            "x-ratelimit-* headers are honoured without it.")
    calls.add_argument("--max_tokens_per_minute", type=POSITIVE_FLOAT,
                       help="Tokens per minute for the whole job (the account's TPM), "
                            "counted before sending: text, images as sent and --max_tokens.")
    calls.add_argument("--max_cost", type=POSITIVE_FLOAT,
                       help="Budget in dollars for the whole job, at the --price_per_million_"
                            "* prices from the answers' usage: once spent, no new request "
                            "starts and the job stops; --resume continues.")
    calls.add_argument("--price_per_million_input_tokens", type=NumberRange(float, 0),
                       help="Dollars per million prompt tokens (for --max_cost and the "
                            "summary's cost).")
    calls.add_argument("--price_per_million_output_tokens", type=NumberRange(float, 0),
                       help="Dollars per million completion tokens.")
    calls.add_argument("--price_per_million_cached_input_tokens", type=NumberRange(float, 0),
                       help="Dollars per million prompt tokens the server served from its "
                            "prefix cache (usage.prompt_tokens_details.cached_tokens; "
                            "default: the input price).")
    calls.add_argument("--worker_processes", type=POSITIVE_INT,
                       help="How many worker processes share the job's per-minute limits "
                            "(default: from the runner's options where they say; needed "
                            "with a limit on Flink, Spark or Portable runners).")
    calls.add_argument("--cache_dir",
                       help="Directory or URL (any fsspec filesystem) where answers are "
                            "stored by request content; later runs reuse them instead of "
                            "paying again. Duplicates within a run are always sent once.")
    calls.add_argument("--skip_preflight", action="store_true", default=False,
                       help="Do not check endpoint, key and model before the job starts.")


def _image_flags(images: FlagGroup) -> None:
    """How images are read, shrunk and encoded, and which URLs may be fetched."""
    images.add_argument("--max_image_side", type=NON_NEGATIVE_INT,
                        help="Longest side sent to the model in pixels (0 keeps the size; "
                             "default 1024, or 512 with --image_detail low, where OpenAI "
                             "shrinks images to 512 itself).")
    images.add_argument("--max_image_bytes", type=POSITIVE_INT,
                        help="Refuse source images larger than this many bytes.")
    images.add_argument("--jpeg_quality", type=NumberRange(int, 1, 100),
                        help="JPEG quality of the re-encoded images.")
    images.add_argument("--image_timeout", type=POSITIVE_FLOAT,
                        help="Seconds to read one record's images (connect and total).")
    images.add_argument("--image_detail", choices=DETAILS,
                        help="OpenAI's image detail sent with every image: low (85 tokens "
                             "an image, whatever its size), high or auto (default: not "
                             "sent, the server's choice).")
    images.add_argument("--token_formula", choices=FORMULAS,
                        help="How image tokens are counted for --max_tokens_per_minute and "
                             "estimates: openai (512-px tiles) or qwen (28-px patches).")
    images.add_argument("--image_retries", type=NON_NEGATIVE_INT,
                        help="Reads after the first for transient image failures (HTTP 5xx "
                             "and 429, resets, timeouts, storage errors), with backoff.")
    images.add_argument("--allow_private_urls", action="store_true",
                        help="Fetch http(s) image URLs that resolve to loopback, private, "
                             "link-local or other non-public addresses (refused by "
                             "default: a manifest could make workers fetch internal "
                             "services such as a cloud metadata server).")


FLAG_GROUPS: tuple[tuple[str, Callable[[FlagGroup], None]], ...] = (
    ("input and output", _input_output_flags),
    ("model endpoint", _endpoint_flags),
    ("batch mode (OpenAI-style Batch API)", _batch_flags),
    ("requests", _request_flags),
    ("images", _image_flags),
)


def add_caption_flags(parser: argparse.ArgumentParser,
                      only: Collection[str] | None = None) -> None:
    """Add the flag table to ``parser``, one argument group per ``FLAG_GROUPS`` entry, each
    flag that is a ``CaptionConfig`` field with the field's default.

    Args:
        parser: any argparse parser (Beam's option parser, ``estimate``'s own).
        only: the flags to add, by name without dashes (all when None); a group left empty
            is not shown by ``--help``.
    """
    defaults = CaptionConfig.flag_defaults()
    for title, add_flags in FLAG_GROUPS:
        add_flags(_TableGroup(parser.add_argument_group(title), defaults, only))


class _TableGroup:
    """An argument group that takes the flags named in ``only`` (all when None), giving those
    named in ``defaults`` (CaptionConfig's fields) their default, which the table never writes."""

    def __init__(self, group: FlagGroup, defaults: dict[str, Any],
                 only: Collection[str] | None):
        self._group = group
        self._defaults = defaults
        self._only = only

    def add_argument(self, *names: str, **settings: Any) -> None:
        name = names[0].lstrip("-")
        if self._only is not None and name not in self._only:
            return
        if name in self._defaults:
            if "default" in settings:
                raise TypeError(f"--{name} takes its default from CaptionConfig.{name}; "
                                "the flag table writes none")
            settings["default"] = self._defaults[name]
        self._group.add_argument(*names, **settings)


def split_inputs(inputs: list[str] | None) -> list[str]:
    """``--input`` values, repeated and/or comma-separated, as one flat list."""
    return [part.strip() for value in inputs or () for part in value.split(",") if part.strip()]
