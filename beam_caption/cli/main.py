"""``python -m beam_caption [flags]`` runs a caption job; ``python -m beam_caption demo`` shows one.

Beam is imported inside ``main``, where Ctrl-C and SIGTERM are handled: the import takes
seconds, and an interrupt during it must end with one line, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

# Importing apache_beam with gcsfs's google-cloud-storage but no apitools logs "apitools not
# found, and bigquery client libraries are not available" on every start (nothing here uses
# BigQuery), and Beam's file sink warns "No shards found to finalize" for a file set left
# empty on purpose (set-aside captions, unsent batch records): the CLI drops those lines.
_NOISE = ("apitools not found", "No shards found to finalize")


def _not_noise(record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(_NOISE))


logging.getLogger().addFilter(_not_noise)  # the import-time line, logged on the root logger

from beam_caption.core.errors import JobStopped, UsageError  # noqa: E402
from beam_caption.core.outputs import (  # noqa: E402
    CAPTIONS_PREFIX,
    REPORT_FILE,
    failures_format,
    file_suffix,
    read_output_records,
)
from beam_caption.core.redact import ScrubbingFilter, clean_key  # noqa: E402

SAMPLE_DIR = Path(__file__).parents[1] / "sample_data"
COMMANDS = ("demo", "estimate", "report", "collect")
VERBOSE_FLAGS = {"-v", "--verbose"}
# Exit statuses besides 0: 1 is a crash (a traceback), 130 an interrupt (Ctrl-C, SIGTERM).
USAGE_OR_STOP = 2  # a usage error, a failed preflight, or a stop (budget, refused key)
TOO_MANY_FAILURES = 3  # the job finished, but more records failed than --max_failure_rate


def print_summary(summary: dict) -> None:
    output = summary["options"]["output"]
    print(f"captioned {summary['captioned']} of {summary['records']} records "
          f"({summary['failed']} failed) in {summary['wall_time_s']:.1f} s, "
          f"{summary['tokens']['total']} tokens, {summary['retries']} retries, "
          f"{summary['throttled_s']:.1f} s throttled")
    if summary["cost"]["total"]:
        print(f"  cost ${summary['cost']['total']:,.4f} (input ${summary['cost']['input']:,.4f}, "
              f"output ${summary['cost']['output']:,.4f})")
    if summary["resumed"]:
        print(f"  {summary['resumed']} captions were kept from the earlier run (--resume)")
    for kind, count in summary["failed_by_type"].items():
        print(f"  failed {kind}: {count}")
    options = summary["options"]
    output_format = options.get("output_format") or "jsonl"
    compression = options.get("output_compression") or "none"
    suffix = file_suffix(output_format, compression)
    failures = f"{output}/failures-*{file_suffix(failures_format(output_format), compression)}"
    report = f", {output}/{REPORT_FILE}" if options.get("report") else ""
    captions = options.get("file_name_prefix") or CAPTIONS_PREFIX
    print(f"outputs: {output}/{captions}-*{suffix}, {failures}, "
          f"{output}/summary.json{report}")
    if summary["failed"] and options.get("max_failure_rate") is None:
        print(f"  the failed records are in {failures}; they leave the exit "
              "status 0 (--max_failure_rate SHARE makes the run exit 3 past that share)")


def exit_status(summary: dict) -> int:
    """0, or TOO_MANY_FAILURES with one line on stderr when more of the job's records failed
    than its --max_failure_rate allows (every output is written by then)."""
    limit = summary["options"].get("max_failure_rate")
    records, failed = summary["records"], summary["failed"]
    if limit is None or not records or failed / records <= limit:
        return 0
    print(f"beam_caption: error: {failed} of {records} records failed ({failed / records:.1%}),"
          f" over --max_failure_rate {limit:g}; the outputs are written", file=sys.stderr)
    return TOO_MANY_FAILURES


def print_translation(translation) -> None:
    """The report of a dry run or template launch (a ``pipeline.Translation``)."""
    done = (f"template written to {translation.template_location}"
            if translation.template_location else "dry run")
    print(f"{done}: {translation.runner} would run {len(translation.steps)} steps; no manifest "
          "or image was read, no request sent, no job started")
    stages = dict.fromkeys("/".join(step.split("/")[:2]) for step in translation.steps)
    print(f"  stages: {', '.join(stages)}")
    print(f"  workers get beam_caption from: {translation.package_source}")


def demo(argv: list[str]) -> int:
    """Caption the bundled sample images with the bundled fake VLM server."""
    from beam_caption.cli.launcher import run
    from beam_caption.testing.fake_vlm import FakeVLMServer

    parser = argparse.ArgumentParser(prog="python -m beam_caption demo", description=demo.__doc__)
    parser.add_argument("--output", default="demo_output", help="output directory")
    args, beam_args = parser.parse_known_args(argv)
    output = args.output if "://" in args.output else str(Path(args.output).resolve())
    with FakeVLMServer() as server:
        print(f"Starting the bundled FAKE VLM server at {server.url}: the captions below come "
              "from a fake model that describes shape and colour, not from a real VLM.")
        summary = run(["--input", str(SAMPLE_DIR / "sample_data.json"), "--output", output,
                       "--api_url", server.url, "--model", "fake-vlm",
                       "--image_root", str(SAMPLE_DIR), "--overwrite", *beam_args])
    print_summary(summary)
    for record in itertools.islice(read_output_records(output, CAPTIONS_PREFIX), 3):
        answers = {key: record.get(key) for key in summary["output_keys"]}
        print(f"  {record['image']} -> "
              f"{answers.popitem()[1] if len(answers) == 1 else json.dumps(answers)}")
    print("\nTo caption your own images with a real model:\n"
          f"  export OPENAI_API_KEY=...   # or DF_API_KEY\n"
          f"  python -m beam_caption --input '{SAMPLE_DIR / 'sample_data.json'}' "
          f"--image_root '{SAMPLE_DIR}' --output captions_out \\\n"
          "      --api_url https://api.openai.com/v1 --model gpt-4o-mini")
    return 0


def print_help() -> None:
    from beam_caption.cli.flag_table import add_caption_flags

    parser = argparse.ArgumentParser(
        prog="python -m beam_caption",
        description="Caption the images of JSON/JSONL manifests with an OpenAI-compatible VLM "
                    "and write captions-*.jsonl, failures-*.jsonl and summary.json.",
        epilog="Every standard Beam option works too (--runner, --direct_running_mode, "
               "--direct_num_workers, --project, --region, --temp_location, ...). "
               "'python -m beam_caption demo [--output DIR]' (also what runs when neither "
               "--input nor --api_url is given) captions the bundled sample images with the "
               "bundled fake VLM server; 'python -m beam_caption estimate --help' counts a "
               "job's tokens and cost without sending anything; 'python -m beam_caption "
               "report OUTDIR' writes OUTDIR/report.html, a page to judge a finished job at "
               "a glance; 'python -m beam_caption collect' with a --mode batch job's flags "
               "waits for its batches and collects them, submitting nothing. -v (--verbose) "
               "shows "
               "beam_caption's debug lines.")
    add_caption_flags(parser)
    parser.print_help()


def _flag_names(argv: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}


def _reported_elsewhere(record: logging.LogRecord) -> bool:
    """False for Beam's traceback of a stop the CLI reports in one line (JobStopped, Ctrl-C),
    whichever logger carries it (Beam's embedded job service logs it on the root logger)."""
    try:
        text = record.getMessage()
    except (TypeError, ValueError):  # arguments that do not fit the format
        text = str(record.msg)
    text += str(record.exc_info[1]) if record.exc_info else ""
    if JobStopped.MARKER in text:
        return False
    return not (record.name.startswith("apache_beam") and "KeyboardInterrupt" in text)


def _api_keys(argv: list[str]) -> tuple[str, ...]:
    """The keys this run may hold (default variables and --api_key_env's), to scrub from logs."""
    from beam_caption.core.api_keys import DEFAULT_API_KEY_ENVS, read_key_file

    names: list[str] = list(DEFAULT_API_KEY_ENVS)
    files: list[str] = []
    for i, arg in enumerate(argv):
        for flag, found in (("--api_key_env", names), ("--api_key_file", files)):
            if arg == flag and i + 1 < len(argv):
                found.append(argv[i + 1])
            elif arg.startswith(flag + "="):
                found.append(arg.split("=", 1)[1])
    keys = [clean_key(os.environ.get(name)) for name in names]
    for path in files:
        with contextlib.suppress(UsageError):  # validate_options reports an unreadable file
            keys.append(read_key_file(path))
    return tuple(filter(None, keys))


def _configure_logging(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_noise)  # lines of Beam's own loggers reach the handlers only
        handler.addFilter(_reported_elsewhere)
        handler.addFilter(ScrubbingFilter(_api_keys(argv)))


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """The command ``argv`` starts with (None: a caption job, which takes flags only) and the
    rest of ``argv``; a first word that is no command is refused, never run as the demo."""
    if not argv or argv[0].startswith("-"):
        return None, argv
    if argv[0] in COMMANDS:
        return argv[0], argv[1:]
    close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UsageError(f"unknown command {argv[0]!r} ({hint}commands: {', '.join(COMMANDS)}; "
                     "a caption job takes flags only, see --help)")


def _dispatch(argv: list[str]) -> int:
    """Run what ``argv`` asks for; returns the exit status."""
    verbose = bool(set(argv) & VERBOSE_FLAGS)
    command, args = _split_command([arg for arg in argv if arg not in VERBOSE_FLAGS])
    _configure_logging(args)
    if verbose:  # this package's debug lines: failures, retries, throttling, worker figures
        logging.getLogger("beam_caption").setLevel(logging.DEBUG)
    flags = _flag_names(args)
    if command == "estimate":
        from beam_caption.cli.estimate import main as estimate

        return estimate(args)
    if command == "report":
        from beam_caption.cli.report import main as report

        return report(args)
    if flags & {"-h", "--help"}:
        if command == "demo":
            return demo(args)  # its parser prints its help and exits
        print_help()
        return 0
    from beam_caption.cli.flags import check_flags

    check_flags(args)
    if command is None and not flags & {"--input", "--api_url"}:
        print("No --input and no --api_url: running the demo (see --help).")
        command = "demo"
    if command == "demo":
        return demo(args)
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_caption.cli.launcher import run, translate, translates_only

    if command != "collect" and translates_only(PipelineOptions(args)):
        print_translation(translate(args))
        return 0
    summary = run(args, collect_only=command == "collect")
    print_summary(summary)
    return exit_status(summary)


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (what schedulers and ``timeout`` send) raises KeyboardInterrupt, as Ctrl-C does,
    so finished captions are checkpointed and the exit is 130 either way."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C or SIGTERM, also as Beam re-raises it from a transform:
    RuntimeError("KeyboardInterrupt [...]")."""
    return isinstance(exc, KeyboardInterrupt) or str(exc).startswith("KeyboardInterrupt")


def guarded(command: Callable[[], int], prog: str = "beam_caption") -> int:
    """``command()``'s exit status, or USAGE_OR_STOP after a usage error or a stop and 130 when
    interrupted (Ctrl-C or SIGTERM), each said in one line on stderr (also for the recipes of
    pipelines/, cli/recipe.py)."""
    with _sigterm_as_ctrl_c():
        try:
            return command()
        except UsageError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return USAGE_OR_STOP
        except (KeyboardInterrupt, RuntimeError) as exc:
            if not _is_interrupt(exc):
                raise
            print(f"{prog}: interrupted. Captions finished so far are checkpointed in the "
                  "output directory; run the same command with --resume to continue.",
                  file=sys.stderr)
            return 130


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns 0, 2 after a usage error or a stop (one line), 3 when more records
    failed than --max_failure_rate allows, or 130 when interrupted."""
    args = sys.argv[1:] if argv is None else argv
    return guarded(lambda: _dispatch(args))


if __name__ == "__main__":
    sys.exit(main())
