"""The launcher: check flags and endpoint, prepare the output, run CaptionManifests, report."""

from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption.checkpoint import clear_checkpoints
from beam_caption.errors import JobStopped, StoppedError
from beam_caption.manifest import match_manifests
from beam_caption.options import (
    CaptionOptions,
    check_flags,
    resolve_api_key,
    split_inputs,
    validate_options,
)
from beam_caption.preflight import preflight
from beam_caption.records import METRICS_NAMESPACE
from beam_caption.resume import prepare_output_dir, remove_temp_files
from beam_caption.sinks import read_summary, write_summary
from beam_caption.transform import CaptionManifests, caption_config


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, check the endpoint, run the job to completion; returns summary.json's content.

    Raises UsageError (or PreflightError) before anything runs when the job cannot work.
    """
    started = time.monotonic()
    check_flags(list(argv or []))
    options = PipelineOptions(argv).view_as(CaptionOptions)
    validate_options(options)
    manifest_files = match_manifests(split_inputs(options.input))
    config = caption_config(options)
    if not options.skip_preflight:
        preflight(config.client, resolve_api_key(options.api_key_env))
    resume = prepare_output_dir(options.output, options.resume, options.overwrite)
    pipeline = beam.Pipeline(options=options)
    pipeline | "CaptionManifests" >> CaptionManifests.from_options(
        options, manifest_files, reuse_checkpoints=resume)
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
    summary = read_summary(options.output)
    wall = time.monotonic() - started
    summary["wall_time_s"] = round(wall, 3)
    summary["images_per_s"] = round(summary["images_captioned"] / wall, 2) if wall else None
    summary["throttled_s"] = _counter(result, "throttled_ms") / 1000
    write_summary(summary, options.output)
    return summary


def _counter(result, name: str) -> int:
    try:
        counters = result.metrics().query(
            MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name))["counters"]
    except (NotImplementedError, AttributeError):
        return 0
    return sum(c.committed or c.attempted or 0 for c in counters)
