"""A pipeline of ``pipelines/`` launched as ``python -m beam_caption`` launches its job.

A recipe declares its own flags (``Recipe.add_flags``), maps them onto the CLI's before they
are checked (``Recipe.adopt``) and applies its graph (``Recipe.build``); ``Recipe.main`` does
the rest as the CLI does: a flag nobody defines is refused, the flags are checked, the endpoint
preflighted, the output directory's rules applied (refused when it holds earlier outputs,
``--resume``, ``--overwrite``), the job run to completion (a stop is one line and its temp
files are removed), the checkpoints cleared, the summary line printed, and the exit status is
0, 2 (a usage error, a failed preflight or a stop), 3 (past ``--max_failure_rate``) or 130
(interrupted). ``--help`` lists the recipe's flags, then the CLI's. Recipes run online jobs:
``--mode batch`` and dry runs are the CLI's.

A recipe flag ``--file_name_prefix`` (``Recipe.add_flags``) names the caption shards instead of
``captions``; the output directory's rules and ``--resume`` follow it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption.cli.config import flags_config, manifests_job
from beam_caption.cli.flags import (
    CaptionOptions,
    check_flags,
    is_local_runner,
    prepare_launch,
    reported_options,
    split_inputs,
    validate_options,
)
from beam_caption.cli.launcher import _new_pipeline, _run_to_completion, translates_only
from beam_caption.cli.main import _configure_logging, exit_status, guarded, print_summary
from beam_caption.cli.output_dir import prepare_output_dir
from beam_caption.cli.preflight import preflight
from beam_caption.cli.progress import live_progress
from beam_caption.cli.report import write_report
from beam_caption.core.errors import UsageError
from beam_caption.core.manifest_reader import match_manifests
from beam_caption.core.outputs import CAPTIONS_PREFIX, FAILURES_PREFIX, SET_ASIDE_PREFIX
from beam_caption.core.settings import CaptionConfig
from beam_caption.transforms.checkpoint import clear_checkpoints
from beam_caption.transforms.job import CaptionManifests
from beam_caption.transforms.write import read_summary

_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class _RecipeParser(argparse.ArgumentParser):
    """A recipe's own flags; a bad value raises UsageError (one line), as the CLI's flags do."""

    def error(self, message: str):
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class RecipeJob:
    """What a recipe's ``build`` gets: its own flags, the CLI's, and the launch's state."""

    recipe_flags: argparse.Namespace
    options: CaptionOptions
    files: list[str]  # the files matched by --input
    config: CaptionConfig  # the flags' configuration (bc.CaptionConfig)
    resume: bool  # --resume found earlier captions to reuse
    started_at: float
    progress_dir: str | None
    captions_prefix: str

    def caption_manifests(self, config: CaptionConfig | None = None) -> CaptionManifests:
        """The CLI's job for these flags: ``pipeline | job.caption_manifests()`` reads the
        manifests, skips what --resume keeps, captions, checkpoints and writes the outputs
        and summary.json (``config``: the recipe's, by default the flags')."""
        return manifests_job(self.options, self.files, reuse_checkpoints=self.resume,
                             started_at=self.started_at, progress_dir=self.progress_dir,
                             config=(config or self.config).worker_config(),
                             captions_prefix=self.captions_prefix)


def _no_flags(parser: Any) -> None:
    """A recipe without flags of its own."""


def _nothing_to_adopt(recipe_flags: argparse.Namespace, options: CaptionOptions) -> None:
    """A recipe whose flags the CLI's need not follow."""


def _caption_manifests(pipeline: beam.Pipeline, job: RecipeJob) -> None:
    _ = pipeline | "CaptionManifests" >> job.caption_manifests()


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A pipeline of ``pipelines/``: its name, help, own flags and graph (see the module).

    ``adopt(recipe_flags, options)`` runs before the flags are checked: it sets the CLI's
    options from the recipe's (``--images_file`` is ``--input``...) and raises UsageError for
    a contradiction. ``prepare(recipe_flags, options)`` runs once the output directory is
    ready, before the manifests are matched (a recipe that writes its own manifest there).
    ``build(pipeline, job)`` applies the graph; by default the CLI's job. A recipe whose
    ``--input`` is not manifests (``manifests=False``: it reads them itself, and writes with
    ``bc.WriteCaptions``) shows no live progress and refuses ``--resume``.
    """

    prog: str
    description: str
    build: Callable[[beam.Pipeline, RecipeJob], None] = _caption_manifests
    add_flags: Callable[[Any], None] = _no_flags  # gets an argparse parser or group
    adopt: Callable[[argparse.Namespace, CaptionOptions], None] = _nothing_to_adopt
    prepare: Callable[[argparse.Namespace, CaptionOptions], None] = _nothing_to_adopt
    manifests: bool = True

    def main(self, argv: list[str] | None = None) -> int:
        """Run the recipe as a command; returns the exit status (see the module)."""
        args = sys.argv[1:] if argv is None else list(argv)
        return guarded(lambda: self._main(args), self.prog)

    def _main(self, argv: list[str]) -> int:
        if {"-h", "--help"} & set(argv):
            self._parser(add_help=True).print_help()
            return 0
        _configure_logging(argv)
        summary = self.run(argv)
        print_summary(summary)
        return exit_status(summary)

    def run(self, argv: list[str]) -> dict:
        """Launch the recipe's job and wait for it; returns summary.json's content."""
        started_at = time.time()
        recipe_flags, rest = self._parser().parse_known_args(argv)
        check_flags(rest)
        options = PipelineOptions(rest).view_as(CaptionOptions)
        self.adopt(recipe_flags, options)
        validate_options(options)
        if options.mode != "online" or translates_only(options):
            raise UsageError(f"{self.prog} runs online jobs: --mode batch, --dry_run and "
                             "--template_location are python -m beam_caption's")
        if options.resume and not self.manifests:
            raise UsageError(f"{self.prog} does not resume: run it again with --overwrite, or "
                             "into a new --output")
        captions_prefix = _captions_prefix(recipe_flags, options)
        prepare_launch(options)
        FileSystems.set_options(options)  # --output is checked before any pipeline exists
        config = flags_config(options)
        worker = config.worker_config()
        api_key = worker.api_key.resolve()  # read once here: an unreadable key stops the launch
        if not options.skip_preflight:
            preflight(worker.client, api_key)
        resume = prepare_output_dir(options.output, options.resume, options.overwrite,
                                    captions_prefix)
        self.prepare(recipe_flags, options)
        files = match_manifests(split_inputs(options.input))
        pipeline = _new_pipeline(options)
        shows_progress = self.manifests and is_local_runner(options) and not options.no_progress
        with (live_progress(files) if shows_progress
              else contextlib.nullcontext()) as progress_dir:
            self.build(pipeline, RecipeJob(recipe_flags, options, files, config, resume,
                                           started_at, progress_dir, captions_prefix))
            _run_to_completion(pipeline, options.output)
        clear_checkpoints(options.output)
        if options.report:
            write_report(options.output)
        summary = read_summary(options.output)
        # what the summary line and exit status read: the flags, where the library's
        # summary.json (bc.WriteCaptions) shows no such option
        return {**summary, "options": {**reported_options(options), **summary["options"]}}

    def _parser(self, add_help: bool = False) -> argparse.ArgumentParser:
        """The recipe's flags; with ``add_help``, the CLI's too (what --help shows)."""
        parser = _RecipeParser(prog=self.prog, description=self.description,
                               add_help=add_help, allow_abbrev=False,
                               epilog="Every standard Beam option works too (--runner, ...).")
        self.add_flags(parser.add_argument_group(f"{self.prog}'s own flags"))
        if add_help:
            CaptionOptions._add_argparse_args(parser)
        return parser


def _captions_prefix(recipe_flags: argparse.Namespace, options: CaptionOptions) -> str:
    """The caption shards' prefix: the recipe's --file_name_prefix, or ``captions``."""
    prefix = getattr(recipe_flags, "file_name_prefix", None) or CAPTIONS_PREFIX
    if prefix == CAPTIONS_PREFIX:
        return prefix
    if not _PREFIX.fullmatch(prefix) or prefix in (FAILURES_PREFIX, SET_ASIDE_PREFIX):
        raise UsageError(f"--file_name_prefix {prefix!r}: use letters, digits, '_', '.' and "
                         f"'-' (not {FAILURES_PREFIX!r} or {SET_ASIDE_PREFIX!r})")
    if options.report:
        raise UsageError("--report reads captions-*: leave out --file_name_prefix or --report")
    return prefix


def same_flag(name: str, value, cli_name: str, cli_value):
    """The value of a recipe flag that means a CLI flag (``--cache_path`` is ``--output``):
    whichever is given; UsageError when both are, with different values."""
    if value is None or value == cli_value:
        return cli_value
    if cli_value not in (None, []):
        raise UsageError(f"{name} and {cli_name} say the same thing: give one of them")
    return value
