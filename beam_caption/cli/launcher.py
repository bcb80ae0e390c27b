"""The launcher: check flags and endpoint, prepare the output, run the job, report.

Its public steps, which the CLI (``run``) and the recipes (cli/recipe.py) share:

- ``launch_options``: the flags parsed and checked;
- ``Launch.prepare``: the manifests matched, the API key read, the endpoint preflighted, the
  output directory's rules applied (``--resume``, ``--overwrite``); the ``Launch`` then makes
  the public transforms of the job for these flags (``read_manifests``, ``caption_records``,
  ``write_captions``, or the three in a row: ``caption_manifests``);
- ``run_pipeline``: the graph built and run to completion, with a local run's live progress;
  a stop is one StoppedError and its temp files are removed;
- ``finish``: the checkpoints cleared, ``--report`` written, summary.json read.

A dry run (``--dry_run True``) or a template launch (``--template_location``) only translates:
``translate`` builds the same graph from the manifest patterns as given, touches no storage,
sends no request and starts no job (on Dataflow the runner translates the job, or stages the
template), and says what would run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
    TestOptions,
    WorkerOptions,
)

from beam_caption.cli.batch_launch import budgeted, submit_and_wait
from beam_caption.cli.config import flags_config
from beam_caption.cli.flags import (
    CaptionOptions,
    check_flags,
    is_local_runner,
    prepare_launch,
    reported_options,
    split_inputs,
    validate_options,
)
from beam_caption.cli.output_dir import prepare_output_dir, remove_temp_files
from beam_caption.cli.preflight import preflight
from beam_caption.cli.progress import live_progress
from beam_caption.cli.report import write_report
from beam_caption.core.errors import JobStopped, StoppedError, UsageError
from beam_caption.core.inputs import check_inputs, default_prompt
from beam_caption.core.manifest_reader import match_manifests
from beam_caption.core.outputs import CAPTIONS_PREFIX
from beam_caption.core.settings import CaptionConfig
from beam_caption.transforms.batch import CollectBatchResults
from beam_caption.transforms.checkpoint import clear_checkpoints
from beam_caption.transforms.job import CaptionManifests
from beam_caption.transforms.library import CaptionRecords, ReadManifests, WriteCaptions
from beam_caption.transforms.write import read_summary

_FALSE_WORDS = ("false", "no", "0", "off", "")


class Translation(NamedTuple):
    """What a dry run or template launch would run."""

    runner: str
    steps: list[str]  # the graph's leaf transforms, in graph order
    package_source: str  # how workers get beam_caption, in words
    template_location: str | None  # where the template went (template launches)


@dataclasses.dataclass(frozen=True)
class Launch:
    """A job ready to run (``Launch.prepare``), and the public transforms of its graph.

    Attributes:
        options: The checked flags.
        config: The flags' configuration (``bc.CaptionConfig``).
        api_key: The key read on the launcher (None: none found).
        resume: Whether ``--resume`` found earlier captions to reuse.
        files: The manifest files ``--input`` matched (a dry run: its patterns, unmatched).
        started_at: ``time.time()`` when the launch began (summary.json's wall time).
        captions_prefix: The caption files' name (a recipe's ``--file_name_prefix``).
        progress_dir: Where a local run's workers drop their counts for the live progress,
            set while ``run_pipeline`` builds and runs the graph; None otherwise.
    """

    options: CaptionOptions
    config: CaptionConfig
    api_key: str | None
    resume: bool
    files: list[str]
    started_at: float
    captions_prefix: str = CAPTIONS_PREFIX
    progress_dir: str | None = None

    @classmethod
    def prepare(cls, options: CaptionOptions, started_at: float, *,
                captions_prefix: str = CAPTIONS_PREFIX,
                write_input: Callable[[], None] | None = None,
                check_images: bool = True) -> Launch:
        """Match the manifests, read the API key (an unreadable key stops the launch),
        preflight the endpoint (not with ``--skip_preflight``) and apply the output
        directory's rules; UsageError (or PreflightError) before anything runs when the job
        cannot work. ``write_input`` writes the job's manifests into the prepared output
        directory (a recipe's own input): they are matched after it, not first.
        ``check_images``: refuse tables without the ``--image_key`` column (not for a recipe
        that reads its ``--input`` itself)."""
        def matched() -> list[str]:
            files = match_manifests(split_inputs(options.input))
            if check_images:
                check_inputs(files, options.image_key)  # tables without the image column
            return files

        files = [] if write_input else matched()
        if files and not (options.prompt or options.prompts_file):
            options.prompt = default_prompt(files)  # shards alone: the sample prompt
            if options.prompt:
                logging.getLogger(__name__).info("no --prompt: each sample is asked %r",
                                                 options.prompt)
        config = flags_config(options)
        worker = config.worker_config()
        api_key = worker.api_key.resolve()  # read once here
        if not options.skip_preflight:
            preflight(worker.client, api_key)
        resume = prepare_output_dir(options.output, options.resume, options.overwrite,
                                    captions_prefix)
        if write_input:
            write_input()
            files = matched()
        return cls(options, config, api_key, resume, files, started_at, captions_prefix)

    def read_manifests(self) -> ReadManifests:
        """``bc.ReadManifests`` of the matched files (not matched again), counting unreadable
        lines in the live progress."""
        return ReadManifests(self.files, match=False, progress_dir=self.progress_dir,
                             image_key=self.config.image_key,
                             max_image_bytes=self.config.max_image_bytes)

    def caption_records(self, config: CaptionConfig | None = None, *,
                        key_field: str | None = None,
                        captioner: beam.PTransform | None = None) -> CaptionRecords:
        """``bc.CaptionRecords`` of ``config`` (by default the flags') with the launch's
        checkpoints in ``--output`` (every ``--checkpoint_interval``), ``--resume`` and live
        progress and ``--copy_images`` (``key_field``, ``captioner``: see CaptionRecords)."""
        return CaptionRecords(config or self.config, key_field=key_field,
                              checkpoint_dir=self.options.output,
                              checkpoint_interval=self.options.checkpoint_interval,
                              resume=self.resume, progress_dir=self.progress_dir,
                              captioner=captioner, copy_images=self.options.copy_images)

    def write_captions(self, config: CaptionConfig | None = None) -> WriteCaptions:
        """``bc.WriteCaptions`` into ``--output`` as the flags say (prefix, shards, format,
        compression, --copy_images), summary.json showing the flags."""
        options = self.options
        return WriteCaptions(options.output, config or self.config,
                             prefix=self.captions_prefix, num_shards=options.num_shards,
                             output_format=options.output_format,
                             compression=options.output_compression,
                             copy_images=options.copy_images, started_at=self.started_at,
                             summary_options=reported_options(options))

    def caption_manifests(self, config: CaptionConfig | None = None,
                          captioner: beam.PTransform | None = None) -> CaptionManifests:
        """The CLI's job: ``read_manifests``, ``caption_records`` and ``write_captions`` in a
        row, as one composite."""
        return CaptionManifests(self.read_manifests(),
                                self.caption_records(config, captioner=captioner),
                                self.write_captions(config))


def run(argv: list[str] | None = None, collect_only: bool = False) -> dict:
    """Parse flags, check the endpoint, run the job to completion; returns summary.json's content.

    A local run shows its live progress on stderr (not with ``--no_progress``; see progress.py);
    ``--report`` writes report.html after the job. With ``--mode batch`` the requests go
    through the Batch API (batch_launch.py); ``collect_only`` (the ``collect`` command) submits
    nothing and collects the batches already in ``--output``. Raises UsageError (or
    PreflightError) before anything runs when the job cannot work, and for a dry run or
    template launch (use ``translate``).
    """
    started_at = time.time()
    options = launch_options([*(argv or []), "--mode", "batch"] if collect_only else argv)
    if translates_only(options):
        raise UsageError("--dry_run and --template_location start no job: use translate()")
    if collect_only:
        if options.overwrite:
            raise UsageError("collect keeps what --output holds: leave out --overwrite")
        options.resume = True
    launch = Launch.prepare(options, started_at)
    batch = options.mode == "batch"
    captioner = _collect_batches(launch, collect_only) if batch else None

    def build(pipeline: beam.Pipeline, job: Launch) -> None:
        _ = pipeline | "CaptionManifests" >> job.caption_manifests(captioner=captioner)

    # In batch mode the poll lines were the progress; collecting takes seconds.
    run_pipeline(launch, build, progress=not batch)
    return finish(launch)


def _collect_batches(launch: Launch, collect_only: bool) -> CollectBatchResults:
    """Batch mode before the job: submit what no batch holds yet (not ``collect_only``) and
    wait for the batches (batch_launch.py); returns the caption step that collects them."""
    options, config = launch.options, launch.config.worker_config()
    submit_and_wait(options, launch.files, config, launch.api_key, launch.resume,
                    _new_pipeline, collect_only)
    return CollectBatchResults(budgeted(config, options, options.output), options.output,
                               fallback=options.fallback == "online",
                               max_result_bytes=options.batch_max_result_bytes)


def run_pipeline(launch: Launch, build: Callable[[beam.Pipeline, Launch], None], *,
                 progress: bool = True) -> None:
    """Build the job's graph (``build(pipeline, launch)``, the launch with its
    ``progress_dir``) and run it to completion. A local run shows its live progress on stderr
    while it runs, unless ``--no_progress`` or not ``progress``; a stop (JobStopped) raises
    StoppedError, and any failure removes the job's temp files from ``--output``."""
    options = launch.options
    pipeline = _new_pipeline(options)
    shows_progress = progress and is_local_runner(options) and not options.no_progress
    with (live_progress(launch.files) if shows_progress
          else contextlib.nullcontext()) as progress_dir:
        build(pipeline, dataclasses.replace(launch, progress_dir=progress_dir))
        _run_to_completion(pipeline, options.output)


def finish(launch: Launch) -> dict:
    """After a complete job: clear the checkpoints (the outputs hold every caption), write
    report.html with ``--report``; returns summary.json's content."""
    output = launch.options.output
    clear_checkpoints(output)
    if launch.options.report:
        write_report(output)
    return read_summary(output)


def _run_to_completion(pipeline: beam.Pipeline, output_dir: str) -> None:
    """Run the job and wait for it; a stop (JobStopped) raises StoppedError."""
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except BaseException as exc:
        remove_temp_files(output_dir)
        reason = JobStopped.find(str(exc))
        if reason is not None:
            raise StoppedError(reason) from None
        raise


def translates_only(options: PipelineOptions) -> bool:
    """Whether these options ask for a dry run or a template rather than a job."""
    return bool(_dry_run(options) or options.view_as(GoogleCloudOptions).template_location)


def translate(argv: list[str] | None = None) -> Translation:
    """Build the job's graph and hand it to the runner without running it (see the module)."""
    options = launch_options(argv)
    if not translates_only(options):
        raise UsageError("translate() needs --dry_run True or --template_location")
    runner = options.view_as(StandardOptions).runner
    cloud = options.view_as(GoogleCloudOptions)
    dataflow = runner == "DataflowRunner"
    if cloud.template_location and not dataflow:
        raise UsageError(f"--template_location makes a Dataflow template; --runner is {runner}")
    if dataflow and not (cloud.temp_location or cloud.staging_location):
        raise UsageError("a Dataflow dry run or template needs --temp_location gs://BUCKET/tmp "
                         "(without it the runner waits for credentials to find a bucket)")
    launch = Launch(options, flags_config(options), None, False, split_inputs(options.input),
                    time.time())
    pipeline = _new_pipeline(options)
    _ = pipeline | "CaptionManifests" >> launch.caption_manifests()
    steps = _leaf_steps(pipeline)
    if dataflow:
        pipeline.run()  # translates (dry run) or stages the template; starts no job
    return Translation(runner, steps, _package_source(options), cloud.template_location)


def launch_options(argv: list[str] | None,
                   adopt: Callable[[CaptionOptions], None] | None = None) -> CaptionOptions:
    """The flags of ``argv``, checked (UsageError) and fixed for the launch
    (flags.prepare_launch); ``adopt`` sets options from others before they are checked (a
    recipe's own flags)."""
    check_flags(list(argv or []))
    options = PipelineOptions(argv).view_as(CaptionOptions)
    if adopt is not None:
        adopt(options)
    validate_options(options)
    prepare_launch(options)
    # The launcher checks and clears --output through Beam's filesystems before any pipeline
    # has given them its options (S3's needs them to make a client).
    FileSystems.set_options(options)
    return options


def _new_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A pipeline for these options; the runner's refusal of them as a UsageError."""
    try:
        return beam.Pipeline(options=options)
    except ValueError as exc:
        if "validations errors" not in str(exc):
            raise
        reasons = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise UsageError(f"--runner {options.view_as(StandardOptions).runner} refuses the "
                         f"options: {'; '.join(reasons)}") from None


def _dry_run(options: PipelineOptions) -> bool:
    """--dry_run as Beam reads it: any value is true, so 'False' is refused, not run as a job."""
    value = options.view_as(TestOptions).dry_run
    if isinstance(value, str) and value.strip().lower() in _FALSE_WORDS:
        raise UsageError(f"--dry_run {value!r}: Beam takes any value as true; leave the flag out "
                         "to run the job")
    return bool(value)


def _leaf_steps(pipeline: beam.Pipeline) -> list[str]:
    transforms = pipeline.to_runner_api().components.transforms
    return [transform.unique_name for transform in transforms.values()
            if not transform.subtransforms]


def _package_source(options: PipelineOptions) -> str:
    """How the job's workers get beam_caption, in words."""
    if is_local_runner(options):
        return "the launcher's own environment (local runner)"
    setup, worker = options.view_as(SetupOptions), options.view_as(WorkerOptions)
    given = [f"{flag} {value}" for flag, value in (
        ("--setup_file", setup.setup_file), ("--requirements_file", setup.requirements_file),
        ("--extra_packages", " ".join(setup.extra_packages or ())),
        ("--sdk_container_image", worker.sdk_container_image)) if value]
    if given:
        return ", ".join(given)
    portable = options.view_as(PortableOptions)
    if portable.environment_type in ("EXTERNAL", "PROCESS", "LOOPBACK"):
        return (f"the environment of the {portable.environment_type} workers "
                f"({portable.environment_config or 'default'}): beam_caption must be installed "
                "there")
    return ("none given: workers must already have beam_caption installed (give --setup_file "
            "./setup.py or an --sdk_container_image that has it)")
