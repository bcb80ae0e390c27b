"""A pipeline of ``pipelines/`` launched as ``python -m beam_caption`` launches its job.

A recipe declares its own flags (``Recipe.add_flags``), maps them onto the CLI's before they
are checked (``Recipe.adopt``) and applies its graph (``Recipe.build``) with the public
transforms the launch makes for the flags (cli/launcher.Launch: ``bc.ReadManifests``,
``bc.CaptionRecords``, ``bc.WriteCaptions``); ``Recipe.main`` does the rest with the CLI's own
launch steps (cli/launcher.py): a flag nobody defines is refused, the flags are checked, the
endpoint preflighted, the output directory's rules applied (refused when it holds earlier
outputs, ``--resume``, ``--overwrite``), the job run to completion (a stop is one line and its
temp files are removed), the checkpoints cleared, the summary line printed, and the exit
status is 0, 2 (a usage error, a failed preflight or a stop), 3 (past ``--max_failure_rate``)
or 130 (interrupted). ``--help`` lists the recipe's flags, then the CLI's. Recipes run online
jobs: ``--mode batch`` and dry runs are the CLI's.

A recipe flag ``--file_name_prefix`` (``Recipe.add_flags``) names the caption shards instead of
``captions``; the output directory's rules and ``--resume`` follow it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam

from beam_caption.cli.flags import CaptionOptions
from beam_caption.cli.launcher import (
    Launch,
    finish,
    launch_options,
    run_pipeline,
    translates_only,
)
from beam_caption.cli.main import _configure_logging, exit_status, guarded, print_summary
from beam_caption.core.errors import UsageError
from beam_caption.core.outputs import CAPTIONS_PREFIX
from beam_caption.transforms.library import prefix_problem


class _RecipeParser(argparse.ArgumentParser):
    """A recipe's own flags; a bad value raises UsageError (one line), as the CLI's flags do."""

    def error(self, message: str):
        raise UsageError(message)


def _no_flags(parser: Any) -> None:
    """A recipe without flags of its own."""


def _nothing_to_adopt(recipe_flags: argparse.Namespace, options: CaptionOptions) -> None:
    """A recipe whose flags the CLI's need not follow."""


def _caption_manifests(pipeline: beam.Pipeline, launch: Launch,
                       recipe_flags: argparse.Namespace) -> None:
    """The CLI's job: ``bc.ReadManifests | bc.CaptionRecords``, then ``bc.WriteCaptions``."""
    _ = pipeline | "CaptionManifests" >> launch.caption_manifests()


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A pipeline of ``pipelines/``: its name, help, own flags and graph (see the module).

    ``adopt(recipe_flags, options)`` runs before the flags are checked: it sets the CLI's
    options from the recipe's (``--images_file`` is ``--input``...) and raises UsageError for
    a contradiction. ``prepare(recipe_flags, options)``, when given, runs once the output
    directory is ready, and the manifests are matched after it (a recipe that writes its own
    manifest there). ``build(pipeline, launch, recipe_flags)`` applies the graph with the
    transforms ``launch`` makes (cli/launcher.Launch); by default the CLI's job. A recipe whose
    ``--input`` is not manifests (``manifests=False``: it reads them itself) shows no live
    progress, which counts manifest records.
    """

    prog: str
    description: str
    build: Callable[[beam.Pipeline, Launch, argparse.Namespace], None] = _caption_manifests
    add_flags: Callable[[Any], None] = _no_flags  # gets an argparse parser or group
    adopt: Callable[[argparse.Namespace, CaptionOptions], None] = _nothing_to_adopt
    prepare: Callable[[argparse.Namespace, CaptionOptions], None] | None = None
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
        options = launch_options(rest, lambda options: self.adopt(recipe_flags, options))
        if options.mode != "online" or translates_only(options):
            raise UsageError(f"{self.prog} runs online jobs: --mode batch, --dry_run and "
                             "--template_location are python -m beam_caption's")
        prepare = self.prepare
        write_input = None if prepare is None else lambda: prepare(recipe_flags, options)
        launch = Launch.prepare(options, started_at, write_input=write_input,
                                captions_prefix=_captions_prefix(recipe_flags, options),
                                check_images=self.manifests)
        run_pipeline(launch, lambda pipeline, job: self.build(pipeline, job, recipe_flags),
                     progress=self.manifests)
        return finish(launch)

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
    problem = prefix_problem(prefix)
    if problem:
        raise UsageError(f"--file_name_prefix {problem}")
    if options.report:
        raise UsageError("--report reads captions-*: leave out --file_name_prefix or --report")
    return prefix


def input_from_earlier_output(options: CaptionOptions, from_output: str, manifest: str,
                              what: str) -> None:
    """Make ``--input`` the manifest ``manifest`` that a recipe writes into ``--output`` from
    the ``what`` (captions, failures) of the earlier run in ``from_output``; UsageError for an
    ``--input`` given, no ``--output``, or ``--output`` being ``from_output``."""
    if options.input or not options.output:
        raise UsageError(f"the records come from --from_output's {what}: give --output, "
                         "not --input")
    if os.path.abspath(from_output) == os.path.abspath(options.output):
        raise UsageError("--output must be a new directory, not --from_output")
    options.input = [f"{options.output.rstrip('/')}/{manifest}"]


def same_flag(name: str, value, cli_name: str, cli_value):
    """The value of a recipe flag that means a CLI flag (``--cache_path`` is ``--output``):
    whichever is given; UsageError when both are, with different values."""
    if value is None or value == cli_value:
        return cli_value
    if cli_value not in (None, []):
        raise UsageError(f"{name} and {cli_name} say the same thing: give one of them")
    return value
