"""CaptionManifests: the whole caption job as one composite transform.

read manifests -> [skip what an earlier run captioned] -> caption -> write sharded captions,
failures (and set-aside captions) and summary.json. The CLI's launcher (cli/launcher.py, through
cli/config.manifests_job) and the recipes in pipelines/ apply this same transform.
"""

from __future__ import annotations

import time

import apache_beam as beam

from beam_caption.core.client import ClientSettings, token_count
from beam_caption.core.engine import WorkerConfig
from beam_caption.core.outputs import CAPTIONS_PREFIX, FAILURES_PREFIX, SET_ASIDE_PREFIX
from beam_caption.core.records import CAPTIONS, FAILURES, RECORDS, STATS
from beam_caption.transforms.caption import CaptionImages
from beam_caption.transforms.checkpoint import CheckpointCaptions
from beam_caption.transforms.manifests import ReadManifestFiles
from beam_caption.transforms.skip_done import SET_ASIDE, SkipDone
from beam_caption.transforms.write import WriteRecords, WriteSummary

RESUMED = "resumed"


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
    the caption step (batch mode's CollectBatchResults); ``captions_prefix`` names the caption
    shards (``captions`` by default). Returns the PCollections written:
    ``{CAPTIONS, FAILURES[, RESUMED, SET_ASIDE]}``.
    """

    def __init__(self, files: list[str], config: WorkerConfig, output_dir: str, *,
                 num_shards: int = 0, reuse_checkpoints: bool = False, image_key: str = "image",
                 reported: dict | None = None, checkpoint_interval: float = 10.0,
                 started_at: float | None = None, output_format: str = "jsonl",
                 compression: str = "none", captioner: beam.PTransform | None = None,
                 captions_prefix: str = CAPTIONS_PREFIX):
        super().__init__()
        self._captions_prefix = captions_prefix
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

    def _write(self, prefix: str, skip_if_empty: bool = False) -> WriteRecords:
        return WriteRecords(self._output_dir, prefix, self._num_shards, skip_if_empty,
                            self._output_format, self._compression, self._image_key,
                            self._config.output_keys)

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection[dict]]:
        out = self._output_dir
        progress_dir = self._config.progress_dir
        read = pbegin | "ReadManifests" >> ReadManifestFiles(self._files, progress_dir=progress_dir)
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
        outputs[CAPTIONS] | "WriteCaptions" >> self._write(self._captions_prefix)
        outputs[FAILURES] | "WriteFailures" >> self._write(FAILURES_PREFIX)
        {**outputs, STATS: captioned[STATS]} | "WriteSummary" >> WriteSummary(
            out, self._image_key, self._reported, self._started_at, self._config.output_keys)
        return outputs
