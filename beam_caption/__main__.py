"""``python -m beam_caption [flags]`` runs a caption job; ``python -m beam_caption demo`` shows one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Importing apache_beam with gcsfs's google-cloud-storage but no apitools logs "apitools not
# found, and bigquery client libraries are not available" on every start; nothing here uses
# BigQuery, so the CLI drops that one line.
logging.getLogger().addFilter(
    lambda record: not (isinstance(record.msg, str)
                        and record.msg.startswith("apitools not found")))

from beam_caption.errors import JobStopped, UsageError  # noqa: E402
from beam_caption.options import DEFAULT_API_KEY_ENVS, CaptionOptions  # noqa: E402
from beam_caption.pipeline import run  # noqa: E402
from beam_caption.redact import ScrubbingFilter, clean_key  # noqa: E402

SAMPLE_DIR = Path(__file__).parent / "sample_data"


def print_summary(summary: dict) -> None:
    output = summary["options"]["output"]
    print(f"captioned {summary['captioned']} of {summary['records']} records "
          f"({summary['failed']} failed) in {summary['wall_time_s']:.1f} s, "
          f"{summary['tokens']['total']} tokens, {summary['retries']} retries, "
          f"{summary['throttled_s']:.1f} s throttled")
    if summary["resumed"]:
        print(f"  {summary['resumed']} captions were kept from the earlier run (--resume)")
    for kind, count in summary["failed_by_type"].items():
        print(f"  failed {kind}: {count}")
    print(f"outputs: {output}/captions-*.jsonl, {output}/failures-*.jsonl, {output}/summary.json")


def demo(argv: list[str]) -> int:
    """Caption the bundled sample images with the bundled fake VLM server."""
    from beam_caption.testing.fake_vlm import FakeVLMServer

    parser = argparse.ArgumentParser(prog="python -m beam_caption demo", description=demo.__doc__)
    parser.add_argument("--output", default="demo_output", help="output directory")
    args, beam_args = parser.parse_known_args(argv)
    output = str(Path(args.output).resolve())
    with FakeVLMServer() as server:
        print(f"Starting the bundled FAKE VLM server at {server.url}: the captions below come "
              "from a fake model that describes shape and colour, not from a real VLM.")
        summary = run(["--input", str(SAMPLE_DIR / "sample_data.json"), "--output", output,
                       "--api_url", server.url, "--model", "fake-vlm",
                       "--image_root", str(SAMPLE_DIR), "--overwrite", *beam_args])
    print_summary(summary)
    for path in sorted(Path(output).glob("captions-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines()[:3]:
            record = json.loads(line)
            print(f"  {record['image']} -> {record['caption']}")
    print("\nTo caption your own images with a real model:\n"
          f"  export OPENAI_API_KEY=...   # or DF_API_KEY\n"
          f"  python -m beam_caption --input '{SAMPLE_DIR / 'sample_data.json'}' "
          f"--image_root '{SAMPLE_DIR}' --output captions_out \\\n"
          "      --api_url https://api.openai.com/v1 --model gpt-4o-mini")
    return 0


def print_help() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m beam_caption",
        description="Caption the images of JSON/JSONL manifests with an OpenAI-compatible VLM "
                    "and write captions-*.jsonl, failures-*.jsonl and summary.json.",
        epilog="Every standard Beam option works too (--runner, --direct_running_mode, "
               "--direct_num_workers, --project, --region, --temp_location, ...). "
               "'python -m beam_caption demo [--output DIR]' (also what runs when neither "
               "--input nor --api_url is given) captions the bundled sample images with the "
               "bundled fake VLM server.")
    CaptionOptions._add_argparse_args(parser)
    parser.print_help()


def _flag_names(argv: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}


def _reported_elsewhere(record: logging.LogRecord) -> bool:
    """False for Beam's traceback of a stop the CLI reports in one line (JobStopped, Ctrl-C)."""
    if not record.name.startswith("apache_beam"):
        return True
    text = str(record.msg) + (str(record.exc_info[1]) if record.exc_info else "")
    return JobStopped.MARKER not in text and "KeyboardInterrupt" not in text


def _api_keys(argv: list[str]) -> tuple[str, ...]:
    """The keys this run may hold (default variables and --api_key_env's), to scrub from logs."""
    names = list(DEFAULT_API_KEY_ENVS)
    for i, arg in enumerate(argv):
        if arg == "--api_key_env" and i + 1 < len(argv):
            names.append(argv[i + 1])
        elif arg.startswith("--api_key_env="):
            names.append(arg.split("=", 1)[1])
    return tuple(filter(None, (clean_key(os.environ.get(name)) for name in names)))


def _configure_logging(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_reported_elsewhere)
        handler.addFilter(ScrubbingFilter(_api_keys(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging(argv)
    flags = _flag_names(argv)
    if flags & {"-h", "--help"} and argv[:1] != ["demo"]:
        print_help()
        return 0
    try:
        if argv[:1] == ["demo"]:
            return demo(argv[1:])
        if not flags & {"--input", "--api_url"}:
            print("No --input and no --api_url: running the demo (see --help).")
            return demo(argv)
        print_summary(run(argv))
        return 0
    except UsageError as exc:
        print(f"beam_caption: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RuntimeError) as exc:
        # Beam re-raises Ctrl-C inside a transform as RuntimeError("KeyboardInterrupt [...]").
        if not isinstance(exc, KeyboardInterrupt) and not str(exc).startswith("KeyboardInterrupt"):
            raise
        print("beam_caption: interrupted. Captions finished so far are checkpointed in the "
              "output directory; run the same command with --resume to continue.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
