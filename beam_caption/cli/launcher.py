"""The launcher: check flags and endpoint, prepare the output, run CaptionManifests, report.

A dry run (``--dry_run True``) or a template launch (``--template_location``) only translates:
``translate`` builds the same graph from the manifest patterns as given, touches no storage,
sends no request and starts no job (on Dataflow the runner translates the job, or stages the
template), and says what would run.
"""

from __future__ import annotations

import contextlib
import time
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
from beam_caption.cli.config import caption_config, manifests_job
from beam_caption.cli.flags import (
    CaptionOptions,
    check_flags,
    is_local_runner,
    prepare_launch,
    split_inputs,
    validate_options,
)
from beam_caption.cli.output_dir import prepare_output_dir, remove_temp_files
from beam_caption.cli.preflight import preflight
from beam_caption.cli.progress import live_progress
from beam_caption.cli.report import write_report
from beam_caption.core.errors import JobStopped, StoppedError, UsageError
from beam_caption.core.manifest_reader import match_manifests
from beam_caption.transforms.batch import CollectBatchResults
from beam_caption.transforms.checkpoint import clear_checkpoints
from beam_caption.transforms.write import read_summary

_FALSE_WORDS = ("false", "no", "0", "off", "")


class Translation(NamedTuple):
    """What a dry run or template launch would run."""

    runner: str
    steps: list[str]  # the graph's leaf transforms, in graph order
    package_source: str  # how workers get beam_caption, in words
    template_location: str | None  # where the template went (template launches)


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
    options = _launch_options([*(argv or []), "--mode", "batch"] if collect_only else argv)
    if translates_only(options):
        raise UsageError("--dry_run and --template_location start no job: use translate()")
    if collect_only:
        if options.overwrite:
            raise UsageError("collect keeps what --output holds: leave out --overwrite")
        options.resume = True
    manifest_files = match_manifests(split_inputs(options.input))
    config = caption_config(options)
    api_key = config.api_key.resolve()  # read once here: an unreadable key stops the launch
    if not options.skip_preflight:
        preflight(config.client, api_key)
    resume = prepare_output_dir(options.output, options.resume, options.overwrite)
    captioner = None
    if options.mode == "batch":
        submit_and_wait(options, manifest_files, config, api_key, resume, _new_pipeline,
                        collect_only)
        captioner = CollectBatchResults(budgeted(config, options, options.output),
                                        options.output, fallback=options.fallback == "online",
                                        max_result_bytes=options.batch_max_result_bytes)
    pipeline = _new_pipeline(options)
    # In batch mode the poll lines were the progress; collecting takes seconds.
    shows_progress = (is_local_runner(options) and not options.no_progress
                      and options.mode == "online")
    with (live_progress(manifest_files) if shows_progress
          else contextlib.nullcontext()) as progress_dir:
        pipeline | "CaptionManifests" >> manifests_job(
            options, manifest_files, reuse_checkpoints=resume, started_at=started_at,
            progress_dir=progress_dir, captioner=captioner, config=config)
        _run_to_completion(pipeline, options.output)
    clear_checkpoints(options.output)
    if options.report:
        write_report(options.output)
    return read_summary(options.output)


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
    options = _launch_options(argv)
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
    pipeline = _new_pipeline(options)
    pipeline | "CaptionManifests" >> manifests_job(
        options, split_inputs(options.input))
    steps = _leaf_steps(pipeline)
    if dataflow:
        pipeline.run()  # translates (dry run) or stages the template; starts no job
    return Translation(runner, steps, _package_source(options), cloud.template_location)


def _launch_options(argv: list[str] | None) -> CaptionOptions:
    check_flags(list(argv or []))
    options = PipelineOptions(argv).view_as(CaptionOptions)
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
