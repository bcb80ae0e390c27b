"""From flags to what runs: the worker configuration (``caption_config``) and the job's
transform (``manifests_job``) for parsed CaptionOptions. The launcher and the recipes use these;
the transforms and core below know no flags."""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from beam_caption.cli.flags import CaptionOptions, reported_options
from beam_caption.core.engine import WorkerConfig
from beam_caption.core.outputs import CAPTIONS_PREFIX
from beam_caption.core.settings import CaptionConfig
from beam_caption.transforms.job import CaptionManifests


def flags_config(options: CaptionOptions) -> CaptionConfig:
    """The public configuration from the parsed flags: CaptionConfig's fields, by name
    (core/settings.py)."""
    return CaptionConfig(**{name: getattr(options, name) for name in CaptionConfig.flag_names()})


def caption_config(options: CaptionOptions) -> WorkerConfig:
    """The worker-side configuration from the parsed flags (``flags_config``'s)."""
    return flags_config(options).worker_config()


def manifests_job(options: CaptionOptions, files: list[str], reuse_checkpoints: bool = False,
                  started_at: float | None = None, progress_dir: str | None = None,
                  captioner: beam.PTransform | None = None,
                  config: WorkerConfig | None = None,
                  captions_prefix: str = CAPTIONS_PREFIX) -> CaptionManifests:
    """The CaptionManifests transform the CLI runs for these flags (``progress_dir``: see
    WorkerConfig; ``captioner``: the caption step, CaptionImages by default; ``config``: the
    flags' ``caption_config`` when the caller made it already; ``captions_prefix``: a recipe's
    --file_name_prefix, shown in summary.json's options when not the default)."""
    config = dataclasses.replace(config or caption_config(options), progress_dir=progress_dir)
    reported = reported_options(options)
    if captions_prefix != CAPTIONS_PREFIX:
        reported["file_name_prefix"] = captions_prefix
    return CaptionManifests(
        files, config, options.output, num_shards=options.num_shards,
        reuse_checkpoints=reuse_checkpoints, image_key=options.image_key,
        reported=reported, checkpoint_interval=options.checkpoint_interval,
        started_at=started_at, output_format=options.output_format,
        compression=options.output_compression, captioner=captioner,
        captions_prefix=captions_prefix)
