"""CaptionOptions: every beam_caption flag, typed, beside Beam's own options."""

from __future__ import annotations

import argparse
import os

from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption import DEFAULT_SYSTEM_PROMPT

DEFAULT_API_KEY_ENVS = ("DF_API_KEY", "OPENAI_API_KEY")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


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
        io.add_argument("--num_shards", type=_non_negative_int, default=0,
                        help="Output shards per file set (0 = the runner decides).")
        io.add_argument("--resume", action="store_true", default=False,
                        help="Keep the captions already in --output (final or checkpointed) and "
                             "caption only the other records; earlier failures are retried.")
        io.add_argument("--overwrite", action="store_true", default=False,
                        help="Delete earlier outputs in --output before running (without "
                             "--resume or --overwrite, a non-empty --output is refused).")
        io.add_argument("--checkpoint_interval", type=_positive_float, default=10.0,
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
        api.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
                         help="System prompt sent first in every request ('' sends none).")
        api.add_argument("--prompt", default=None,
                         help="User prompt for every image; by default the record's human turns "
                              "from --conversation_key are used.")
        api.add_argument("--max_tokens", type=_positive_int, default=None,
                         help="Upper bound on caption tokens per request (default: server's).")
        api.add_argument("--temperature", type=float, default=None,
                         help="Sampling temperature (default: server's). A model that refuses "
                              "it (reasoning models) runs without it, with one warning.")
        api.add_argument("--reasoning_effort", default=None,
                         choices=("minimal", "low", "medium", "high"),
                         help="Reasoning effort for reasoning models (gpt-5, o-series); "
                              "captioning rarely needs more than minimal.")

        calls = parser.add_argument_group("requests")
        calls.add_argument("--max_concurrency", type=_positive_int, default=32,
                           help="Requests in flight per worker process.")
        calls.add_argument("--request_timeout", type=_positive_float, default=120.0,
                           help="Seconds per attempt.")
        calls.add_argument("--max_retries", type=_non_negative_int, default=6,
                           help="Attempts after the first for retryable errors.")
        calls.add_argument("--max_backoff", type=_positive_float, default=60.0,
                           help="Longest wait of our own backoff between two attempts.")
        calls.add_argument("--max_retry_wait", type=_positive_float, default=300.0,
                           help="Longest Retry-After honoured: a server asking for longer gets "
                                "the record failed as request/throttled, never retried early.")
        calls.add_argument("--max_response_bytes", type=_positive_int, default=4 * 2**20,
                           help="Larger response bodies fail the record (response_too_large).")
        calls.add_argument("--max_caption_chars", type=_positive_int, default=32_000,
                           help="Longer captions fail the record (caption_too_long).")
        calls.add_argument("--max_bytes_in_flight", type=_positive_int, default=256 * 2**20,
                           help="Image bytes (source files, then request bodies) held by the "
                                "records in flight per worker process; bounds memory at any "
                                "concurrency.")
        calls.add_argument("--max_requests_per_minute", type=_positive_float, default=None,
                           help="Cap on request starts per minute per worker process "
                                "(retries included).")
        calls.add_argument("--cache_dir", default=None,
                           help="Directory or URL (any fsspec filesystem) where answers are "
                                "stored by request content; later runs reuse them instead of "
                                "paying again. Duplicates within a run are always sent once.")
        calls.add_argument("--skip_preflight", action="store_true", default=False,
                           help="Do not check endpoint, key and model before the job starts.")

        images = parser.add_argument_group("images")
        images.add_argument("--max_image_side", type=_non_negative_int, default=1024,
                            help="Longest side sent to the model in pixels (0 keeps the size).")
        images.add_argument("--max_image_bytes", type=_positive_int, default=50 * 2**20,
                            help="Refuse source images larger than this many bytes.")
        images.add_argument("--jpeg_quality", type=_positive_int, default=85,
                            help="JPEG quality of the re-encoded images.")
        images.add_argument("--image_timeout", type=_positive_float, default=60.0,
                            help="Seconds to read one record's images (connect and total).")


BEAM_OPTIONS_REPORTED = ("runner", "direct_running_mode", "direct_num_workers", "project",
                         "region", "job_name", "num_workers", "max_num_workers",
                         "temp_location", "staging_location")


def reported_options(options: PipelineOptions) -> dict:
    """The options a summary shows: every beam_caption flag and the main Beam ones.

    Holds no secret: the API key is never an option, only the name of its variable.
    """
    parser = argparse.ArgumentParser(add_help=False)
    CaptionOptions._add_argparse_args(parser)
    names = [*vars(parser.parse_args([])), *BEAM_OPTIONS_REPORTED]
    values = options.get_all_options(drop_default=False)
    return {name: values.get(name) for name in names}


def resolve_api_key(api_key_env: str | None) -> str | None:
    """The API key from the named variable, else DF_API_KEY, else OPENAI_API_KEY."""
    names = (api_key_env,) if api_key_env else DEFAULT_API_KEY_ENVS
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def split_inputs(inputs: list[str] | None) -> list[str]:
    """``--input`` values, repeated and/or comma-separated, as one flat list."""
    return [part.strip() for value in inputs or () for part in value.split(",") if part.strip()]
