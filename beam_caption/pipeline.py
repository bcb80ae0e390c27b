"""The launcher: check flags and endpoint, prepare the output, run CaptionManifests, report."""

from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption.checkpoint import clear_checkpoints
from beam_caption.errors import JobStopped, StoppedError
from beam_caption.manifest import match_manifests
from beam_caption.options import (
    CaptionOptions,
    check_flags,
    prepare_launch,
    resolve_api_key,
    split_inputs,
    validate_options,
)
from beam_caption.preflight import preflight
from beam_caption.resume import prepare_output_dir, remove_temp_files
from beam_caption.sinks import read_summary
from beam_caption.transform import CaptionManifests, caption_config


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, check the endpoint, run the job to completion; returns summary.json's content.

    Raises UsageError (or PreflightError) before anything runs when the job cannot work.
    """
    started_at = time.time()
    check_flags(list(argv or []))
    options = PipelineOptions(argv).view_as(CaptionOptions)
    validate_options(options)
    prepare_launch(options)
    manifest_files = match_manifests(split_inputs(options.input))
    config = caption_config(options)
    if not options.skip_preflight:
        preflight(config.client, resolve_api_key(options.api_key_env, options.api_key_file))
    resume = prepare_output_dir(options.output, options.resume, options.overwrite)
    pipeline = beam.Pipeline(options=options)
    pipeline | "CaptionManifests" >> CaptionManifests.from_options(
        options, manifest_files, reuse_checkpoints=resume, started_at=started_at)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except BaseException as exc:
        remove_temp_files(options.output)
        reason = JobStopped.find(str(exc))
        if reason is not None:
            raise StoppedError(reason) from None
        raise
    clear_checkpoints(options.output)
    return read_summary(options.output)
