"""From flags to what runs: the worker configuration (``caption_config``) and the job's
transform (``manifests_job``) for parsed CaptionOptions. The launcher and the recipes use these;
the transforms and core below know no flags."""

from __future__ import annotations

import dataclasses
import os

import apache_beam as beam

from beam_caption.cli.flags import CaptionOptions, reported_options
from beam_caption.core.api_keys import KeySource
from beam_caption.core.client import ClientSettings
from beam_caption.core.engine import WorkerConfig
from beam_caption.core.images import ImageSettings
from beam_caption.core.messages import PromptSettings
from beam_caption.core.prompts import load_prompts_file
from beam_caption.core.tokens import default_max_side
from beam_caption.transforms.job import CaptionManifests


def caption_config(options: CaptionOptions) -> WorkerConfig:
    """The worker-side configuration from the parsed flags."""
    max_side = options.max_image_side
    if max_side is None:  # options not prepared by the launcher (a recipe's own pipeline)
        max_side = default_max_side(options.token_formula, options.image_detail)
    return WorkerConfig(
        client=ClientSettings(
            api_url=options.api_url, model=options.model,
            max_concurrency=options.max_concurrency, request_timeout=options.request_timeout,
            max_retries=options.max_retries, max_backoff=options.max_backoff,
            max_requests_per_minute=options.max_requests_per_minute,
            max_tokens_per_minute=options.max_tokens_per_minute,
            worker_processes=options.worker_processes or 1,
            max_tokens=options.max_tokens, temperature=options.temperature,
            reasoning_effort=options.reasoning_effort, max_retry_wait=options.max_retry_wait,
            max_response_bytes=options.max_response_bytes,
            max_caption_chars=options.max_caption_chars,
            max_cost=(options.max_cost / (options.worker_processes or 1)
                      if options.max_cost else None),
            price_per_million_input_tokens=options.price_per_million_input_tokens,
            price_per_million_output_tokens=options.price_per_million_output_tokens,
            batch_discount=options.batch_discount),
        prompts=PromptSettings(
            system_prompt=options.system_prompt or None, prompt=options.prompt,
            image_key=options.image_key, conversation_key=options.conversation_key,
            image_detail=options.image_detail,
            specs=load_prompts_file(options.prompts_file) if options.prompts_file else ()),
        images=ImageSettings(max_side=max_side, max_bytes=options.max_image_bytes,
                             jpeg_quality=options.jpeg_quality),
        image_root=options.image_root or os.getcwd(),
        output_key=options.output_key,
        api_key=KeySource.for_launch(options.api_key_env, options.api_key_file,
                                     options.api_key_secret),
        cache_dir=options.cache_dir,
        max_bytes_in_flight=options.max_bytes_in_flight,
        image_timeout=options.image_timeout,
        image_retries=options.image_retries,
        allow_private_urls=options.allow_private_urls,
        token_formula=options.token_formula,
    )


def manifests_job(options: CaptionOptions, files: list[str], reuse_checkpoints: bool = False,
                  started_at: float | None = None, progress_dir: str | None = None,
                  captioner: beam.PTransform | None = None,
                  config: WorkerConfig | None = None) -> CaptionManifests:
    """The CaptionManifests transform the CLI runs for these flags (``progress_dir``: see
    WorkerConfig; ``captioner``: the caption step, CaptionImages by default; ``config``: the
    flags' ``caption_config`` when the caller made it already)."""
    config = dataclasses.replace(config or caption_config(options), progress_dir=progress_dir)
    return CaptionManifests(
        files, config, options.output, num_shards=options.num_shards,
        reuse_checkpoints=reuse_checkpoints, image_key=options.image_key,
        reported=reported_options(options), checkpoint_interval=options.checkpoint_interval,
        started_at=started_at, output_format=options.output_format,
        compression=options.output_compression, captioner=captioner)
