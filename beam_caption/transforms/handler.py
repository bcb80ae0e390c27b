"""CaptionModelHandler: the caption engine as a model of Beam's RunInference.

The "model" a worker loads is its CaptionRuntime (core/engine.py): the model client, the image
pools and the byte budget, shared by the process's threads as RunInference shares a model.
Each batch's records are sent at once and answered concurrently; a record that fails is its
failure record, returned as the inference like a caption, so RunInference never sees an
exception for it and never retries a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_caption.core.engine import CaptionRuntime
from beam_caption.core.errors import JobStopped
from beam_caption.core.records import keyed_record
from beam_caption.core.settings import CaptionConfig


class CaptionModelHandler(ModelHandler[dict, PredictionResult, CaptionRuntime]):
    """Caption records with ``RunInference``: one ``PredictionResult`` per record.

    Example::

        from apache_beam.ml.inference.base import RunInference

        preds = records | RunInference(bc.CaptionModelHandler(config))
        captions = preds | beam.Map(lambda pred: pred.inference)

    ``PredictionResult.example`` is the record as given; ``.inference`` is the captioned
    record (the record, the caption under ``output_key`` and ``caption_meta``) or the failure
    record (``{"key", "source", "record", "error"}``), exactly as ``CaptionRecords`` makes
    them; ``.model_id`` is the model's name. Records are keyed as ``CaptionRecords`` keys
    them. ``CaptionRecords`` captions faster (records are not held back to fill a batch, and
    a slow one never holds up the others); this handler is for pipelines built around
    RunInference.

    A job that must stop (``max_cost`` spent, the endpoint refusing every request) raises
    JobStopped from the batch that finds it out.
    """

    def __init__(self, config: CaptionConfig, *, key_field: str | None = None,
                 max_batch_size: int | None = None):
        """Make the workers' configuration now, at pipeline construction.

        Args:
            config: How to caption (see ``CaptionRecords``).
            key_field: The record field that keys a record (see ``CaptionRecords``).
            max_batch_size: The most records RunInference hands over at once (default:
                ``config.max_concurrency``, which keeps every request slot busy).
        """
        super().__init__(min_batch_size=1,
                         max_batch_size=max_batch_size or config.max_concurrency)
        self._config = config.worker_config()
        self._key_field = key_field

    def load_model(self) -> CaptionRuntime:
        """The worker's caption engine (its model client reads the API key here)."""
        return CaptionRuntime(self._config)

    def run_inference(self, batch: Sequence[dict], model: CaptionRuntime,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        """Caption a batch of records concurrently: each one's captioned or failure record.

        Raises:
            JobStopped: the job must stop (nothing more is sent).
        """
        elements = [keyed_record(example, self._key_field) for example in batch]
        futures = [None if "error" in element else model.submit(element)
                   for element in elements]
        results = []
        for example, element, future in zip(batch, elements, futures, strict=True):
            if future is None:  # not a record, or no key_field: its failure
                results.append(PredictionResult(example, element, self._config.client.model))
                continue
            try:
                outcome = future.result()
            except JobStopped as stop:
                for other in futures:
                    if other is not None:
                        other.cancel()
                raise model.stopped(stop) from None
            inference = outcome.caption if outcome.failure is None else outcome.failure
            results.append(PredictionResult(example, inference, self._config.client.model))
        return results

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        """Refuse inference_args: every setting is in the CaptionConfig."""
        if inference_args:
            raise ValueError("CaptionModelHandler takes no inference_args: set them in the "
                             "CaptionConfig")
