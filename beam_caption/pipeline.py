"""The caption pipeline: read manifests -> caption -> write, and the launcher around it."""

from __future__ import annotations

import dataclasses
import os
import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption.caption import METRICS_NAMESPACE, CaptionConfig, CaptionImages
from beam_caption.client import ClientSettings
from beam_caption.errors import JobStopped, StoppedError, UsageError
from beam_caption.images import ImageSettings
from beam_caption.manifest import FAILURES, ReadManifests, match_manifests
from beam_caption.messages import PromptSettings
from beam_caption.options import (CaptionOptions, check_flags, reported_options, resolve_api_key,
                                  split_inputs, validate_options)
from beam_caption.preflight import preflight
from beam_caption.resume import (SkipDone, clear_checkpoints, prepare_output_dir,
                                 remove_temp_files)
from beam_caption.sinks import (CAPTIONS_PREFIX, FAILURES_PREFIX, SET_ASIDE_PREFIX,
                                WriteJsonLines, WriteSummary, read_summary, write_summary)


def caption_config(options: CaptionOptions) -> CaptionConfig:
    """The worker-side configuration from the parsed flags."""
    return CaptionConfig(
        client=ClientSettings(
            api_url=options.api_url, model=options.model,
            max_concurrency=options.max_concurrency, request_timeout=options.request_timeout,
            max_retries=options.max_retries, max_backoff=options.max_backoff,
            max_requests_per_minute=options.max_requests_per_minute,
            max_tokens=options.max_tokens, temperature=options.temperature,
            reasoning_effort=options.reasoning_effort, max_retry_wait=options.max_retry_wait,
            max_response_bytes=options.max_response_bytes,
            max_caption_chars=options.max_caption_chars),
        prompts=PromptSettings(
            system_prompt=options.system_prompt or None, prompt=options.prompt,
            image_key=options.image_key, conversation_key=options.conversation_key),
        images=ImageSettings(max_side=options.max_image_side, max_bytes=options.max_image_bytes,
                             jpeg_quality=options.jpeg_quality),
        image_root=options.image_root or os.getcwd(),
        output_key=options.output_key,
        api_key_env=options.api_key_env,
        cache_dir=options.cache_dir,
        max_bytes_in_flight=options.max_bytes_in_flight,
        image_timeout=options.image_timeout,
    )


def build(pipeline: beam.Pipeline, options: CaptionOptions, manifest_files: list[str],
          resume: bool = False) -> dict:
    """Add read -> [skip done] -> caption -> write to ``pipeline``; returns the outputs.

    resume: reuse the captions checkpointed in ``options.output`` (see resume.py).
    """
    config = dataclasses.replace(caption_config(options), checkpoint_dir=options.output,
                                 checkpoint_interval=options.checkpoint_interval)
    read = pipeline | "ReadManifests" >> ReadManifests(manifest_files)
    records = read["records"]
    if resume:
        split = records | "SkipDone" >> SkipDone(options.output, config.settings_digest)
        records = split["todo"]
    captioned = records | "CaptionImages" >> CaptionImages(config)
    failures = ((read[FAILURES], captioned[FAILURES])
                | "AllFailures" >> beam.Flatten())
    outputs = {"captions": captioned["captions"], "failures": failures}
    if resume:
        outputs["resumed"] = split["done"]
        outputs["set_aside"] = split["set_aside"]
        outputs["captions"] = ((captioned["captions"], split["done"])
                               | "WithDone" >> beam.Flatten())
        split["set_aside"] | "WriteSetAside" >> WriteJsonLines(
            options.output, SET_ASIDE_PREFIX, options.num_shards, skip_if_empty=True)
    captions = outputs["captions"]
    captions | "WriteCaptions" >> WriteJsonLines(options.output, CAPTIONS_PREFIX,
                                                  options.num_shards)
    failures | "WriteFailures" >> WriteJsonLines(options.output, FAILURES_PREFIX,
                                                  options.num_shards)
    outputs | "WriteSummary" >> WriteSummary(
        options.output, options.image_key, reported_options(options))
    return outputs


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
    build(pipeline, options, manifest_files, resume=resume)
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
