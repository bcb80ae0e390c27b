"""CaptionManifests: the whole caption job as one composite transform.

read manifests -> [skip what an earlier run captioned] -> caption -> write sharded captions,
failures (and set-aside captions) and summary.json. The CLI's launcher (pipeline.py) and the
recipes in pipelines/ apply this same transform; a user can drop it into their own pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import time

import apache_beam as beam

from beam_caption.caption import CaptionImages
from beam_caption.checkpoint import CheckpointCaptions
from beam_caption.client import ClientSettings, token_count
from beam_caption.images import ImageSettings
from beam_caption.keys import KeySource
from beam_caption.manifest import ReadManifests
from beam_caption.messages import PromptSettings
from beam_caption.options import CaptionOptions, reported_options
from beam_caption.outputs import CAPTIONS_PREFIX, FAILURES_PREFIX, SET_ASIDE_PREFIX
from beam_caption.prompts import load_prompts_file
from beam_caption.records import CAPTIONS, FAILURES, RECORDS, STATS
from beam_caption.resume import SET_ASIDE, SkipDone
from beam_caption.runtime import CaptionConfig
from beam_caption.sinks import WriteRecords, WriteSummary
from beam_caption.tokens import default_max_side

RESUMED = "resumed"


def caption_config(options: CaptionOptions) -> CaptionConfig:
    """The worker-side configuration from the parsed flags."""
    max_side = options.max_image_side
    if max_side is None:  # options not prepared by the launcher (a recipe's own pipeline)
        max_side = default_max_side(options.token_formula, options.image_detail)
    return CaptionConfig(
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


def reused_cost(caption: dict, client: ClientSettings) -> float:
    """What a caption reused by --resume cost when it was made, at this run's prices (nothing
    for an answer from the cache; a Batch API answer at the discount)."""
    meta = caption.get("caption_meta")
    if not isinstance(meta, dict) or meta.get("cached"):
        return 0.0
    return client.cost(token_count(meta.get("prompt_tokens")) or 0,
                       token_count(meta.get("completion_tokens")) or 0, bool(meta.get("batch_id")))


class CaptionManifests(beam.PTransform):
    """Caption every record of ``files`` into ``output_dir``: ``p | CaptionManifests(...)``.

    ``config`` is the worker configuration (``caption_config``); finished captions are
    checkpointed under ``output_dir`` while the job runs. With ``reuse_checkpoints`` (set by the
    launcher when ``--resume`` found earlier captions) records are first matched to them.
    ``reported`` is the options dict summary.json shows; ``started_at`` (``time.time()``, by
    default when the transform is made) is when its wall time starts. ``captioner`` replaces
    the caption step (batch mode's CollectBatchResults). Returns the PCollections written:
    ``{CAPTIONS, FAILURES[, RESUMED, SET_ASIDE]}``.
    """

    def __init__(self, files: list[str], config: CaptionConfig, output_dir: str, *,
                 num_shards: int = 0, reuse_checkpoints: bool = False, image_key: str = "image",
                 reported: dict | None = None, checkpoint_interval: float = 10.0,
                 started_at: float | None = None, output_format: str = "jsonl",
                 compression: str = "none", captioner: beam.PTransform | None = None):
        super().__init__()
        self._captioner = captioner
        self._output_format = output_format
        self._compression = compression
        self._files = list(files)
        self._config = config
        self._checkpoint_interval = checkpoint_interval
        self._output_dir = output_dir
        self._num_shards = num_shards
        self._reuse_checkpoints = reuse_checkpoints
        self._image_key = image_key
        self._reported = reported or {}
        self._started_at = time.time() if started_at is None else started_at

    @classmethod
    def from_options(cls, options: CaptionOptions, files: list[str],
                     reuse_checkpoints: bool = False, started_at: float | None = None,
                     progress_dir: str | None = None,
                     captioner: beam.PTransform | None = None,
                     config: CaptionConfig | None = None) -> CaptionManifests:
        """The transform the CLI runs for these flags (``progress_dir``: see CaptionConfig;
        ``captioner``: the caption step, CaptionImages by default; ``config``: the flags'
        ``caption_config`` when the caller made it already)."""
        config = dataclasses.replace(config or caption_config(options), progress_dir=progress_dir)
        return cls(files, config, options.output,
                   num_shards=options.num_shards, reuse_checkpoints=reuse_checkpoints,
                   image_key=options.image_key, reported=reported_options(options),
                   checkpoint_interval=options.checkpoint_interval, started_at=started_at,
                   output_format=options.output_format, compression=options.output_compression,
                   captioner=captioner)

    def _write(self, prefix: str, skip_if_empty: bool = False) -> WriteRecords:
        return WriteRecords(self._output_dir, prefix, self._num_shards, skip_if_empty,
                            self._output_format, self._compression, self._image_key,
                            self._config.output_keys)

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection[dict]]:
        out = self._output_dir
        progress_dir = self._config.progress_dir
        read = pbegin | "ReadManifests" >> ReadManifests(self._files, progress_dir=progress_dir)
        records = read[RECORDS]
        spent_before = None
        if self._reuse_checkpoints:
            split = records | "SkipDone" >> SkipDone(out, self._config.settings_digest,
                                                     progress_dir)
            records = split["todo"]
            if self._config.client.max_cost:  # the budget is the job's, across --resume
                spent_before = split["done"] | "SpentBefore" >> beam.Map(
                    reused_cost, self._config.client) | "Total" >> beam.CombineGlobally(sum)
        captioned = records | "CaptionImages" >> (
            self._captioner or CaptionImages(self._config, spent_before))
        checkpointed = captioned[CAPTIONS] | "CheckpointCaptions" >> CheckpointCaptions(
            out, self._checkpoint_interval)
        failures = (read[FAILURES], captioned[FAILURES]) | "AllFailures" >> beam.Flatten()
        outputs = {CAPTIONS: checkpointed, FAILURES: failures}
        if self._reuse_checkpoints:
            outputs[RESUMED] = split["done"]
            outputs[SET_ASIDE] = split[SET_ASIDE]
            outputs[CAPTIONS] = (checkpointed, split["done"]) | "WithDone" >> beam.Flatten()
            outputs[SET_ASIDE] | "WriteSetAside" >> self._write(SET_ASIDE_PREFIX,
                                                                 skip_if_empty=True)
        outputs[CAPTIONS] | "WriteCaptions" >> self._write(CAPTIONS_PREFIX)
        outputs[FAILURES] | "WriteFailures" >> self._write(FAILURES_PREFIX)
        {**outputs, STATS: captioned[STATS]} | "WriteSummary" >> WriteSummary(
            out, self._image_key, self._reported, self._started_at, self._config.output_keys)
        return outputs
