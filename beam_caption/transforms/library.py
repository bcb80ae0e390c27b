"""The transforms of the public API (``beam_caption.__all__``): records in, captions and failures
out, for a Beam pipeline of the user's own (docs/library.md).

- ``ReadManifests``: manifest files (paths, globs, URLs) -> ``ManifestRecords`` (keyed records
  and read failures);
- ``CaptionRecords``: record dicts from anywhere, or ``ManifestRecords`` -> ``CaptionResults``
  (captions, failures and the caption step's figures), each record exactly once;
- ``WriteCaptions``: ``CaptionResults`` -> the CLI's output files (``captions-*``,
  ``failures-*``, ``summary.json``).

Each is a thin composite over the steps the CLI's job runs (transforms/manifests.py,
transforms/caption.py, transforms/write.py), so what they write is what the CLI writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import NamedTuple

import apache_beam as beam

from beam_caption.core.manifest_reader import match_manifests
from beam_caption.core.outputs import CAPTIONS_PREFIX, FAILURES_PREFIX
from beam_caption.core.records import CAPTIONS, FAILURES, RECORDS, STATS, keyed_record
from beam_caption.core.redact import redact_url
from beam_caption.core.settings import CaptionConfig
from beam_caption.transforms import manifests
from beam_caption.transforms.caption import CaptionImages
from beam_caption.transforms.write import WriteRecords, WriteSummary


class ManifestRecords(NamedTuple):
    """What ``ReadManifests`` read: feed it whole to ``CaptionRecords``.

    Attributes:
        records: Keyed records ``{"key": "FILE#INDEX", "source": {"file", "index"}, "record"}``.
        failures: One failure record per line or array item that could not be read (the
            shape of ``CaptionResults.failures``, with ``raw`` text instead of ``record``).
    """

    records: beam.PCollection[dict]
    failures: beam.PCollection[dict]


class CaptionResults(NamedTuple):
    """What ``CaptionRecords`` made: every record is in exactly one of captions and failures.

    Attributes:
        captions: Each captioned record as the CLI writes it: the input record unchanged, the
            caption under ``output_key`` (with several prompts, each answer under its own
            key) and ``caption_meta`` (model, tokens, attempts, latency, key, fingerprint).
        failures: Each failure record as the CLI writes it: ``{"key", "source", "record" |
            "raw", "error": {"stage", "type", "message", "attempts", "retryable", ...}}``.
        stats: The caption step's figures per bundle (time waited on rate limits), which
            ``WriteCaptions`` adds to summary.json; most pipelines ignore it.
    """

    captions: beam.PCollection[dict]
    failures: beam.PCollection[dict]
    stats: beam.PCollection[dict]


class ReadManifests(beam.PTransform):
    """Read JSONL and JSON-array manifests (``.gz`` too) into keyed records.

    Example::

        read = p | bc.ReadManifests(["data/*.jsonl", "gs://bucket/more.json"])
        results = read | bc.CaptionRecords(config)

    A record's key is ``FILE#INDEX`` (INDEX: its line or array item, from 0). A line or item
    that cannot be read is a failure record, and reading goes on. The records are reshuffled,
    so that one big manifest is captioned by every worker.
    """

    def __init__(self, patterns: str | Iterable[str]):
        """Match the manifests now, at pipeline construction.

        Args:
            patterns: Paths, globs or URLs (local, gs://, s3://, http(s)://), one or several.

        Raises:
            UsageError: A pattern matches no file.
        """
        super().__init__()
        self._files = match_manifests([patterns] if isinstance(patterns, str) else
                                      list(patterns))

    def expand(self, pbegin: beam.pvalue.PBegin) -> ManifestRecords:
        read = pbegin | "Read" >> manifests.ReadManifestFiles(self._files)
        return ManifestRecords(read[RECORDS], read[FAILURES])


class _KeyRecords(beam.DoFn):
    """Values -> keyed records (core/records.keyed_record); those that cannot be one tagged
    FAILURES."""

    def __init__(self, key_field: str | None):
        self._key_field = key_field

    def process(self, value):
        element = keyed_record(value, self._key_field)
        if "error" in element:
            yield beam.pvalue.TaggedOutput(FAILURES, element)
        else:
            yield element


class CaptionRecords(beam.PTransform):
    """Caption record dicts: ``records | bc.CaptionRecords(config)`` -> ``CaptionResults``.

    Example::

        config = bc.CaptionConfig(api_url="http://localhost:8000/v1", model="my-vlm")
        results = rows | bc.CaptionRecords(config, key_field="id")
        results.captions | beam.Map(print)

    A record is a dict in the manifest shape: its images under ``config.image_key`` (a path,
    URL or list of them, relative ones under ``config.image_root``) and, without
    ``config.prompt``, its conversation under ``config.conversation_key``. Each record becomes
    one captioned record or one failure record (a failure is a value, never an exception that
    retries a bundle); requests run concurrently within each worker (``max_concurrency``),
    with per-record retries and the job-wide limits of the config.

    The input is a ``PCollection`` of records, or what ``ReadManifests`` returns (its read
    failures then go to ``failures``). Keyed records (``{"key", "source", "record"}``, exactly
    these fields, as ReadManifests makes them) keep their key; other records are keyed by
    their ``key_field``, or by their content (``sha256:`` and 16 hex digits).
    """

    def __init__(self, config: CaptionConfig, *, key_field: str | None = None):
        """Make the workers' configuration now, at pipeline construction.

        Args:
            config: How to caption; its prompts file is read now, and where the workers find
                the API key decided (the key itself never enters the pipeline).
            key_field: The record field whose value (as text) keys a record, in
                ``caption_meta.key`` and failure records; a record without it is a
                ``read/missing_key_field`` failure. None: the record's content keys it.
        """
        super().__init__()
        self._config = config.worker_config()
        self._key_field = key_field

    def expand(self, records: beam.PCollection[dict] | ManifestRecords) -> CaptionResults:
        failures = []
        if isinstance(records, ManifestRecords):
            failures.append(records.failures)
            records = records.records
        keyed = records | "KeyRecords" >> beam.ParDo(_KeyRecords(self._key_field)).with_outputs(
            FAILURES, main=RECORDS)
        captioned = keyed[RECORDS] | "Caption" >> CaptionImages(self._config)
        failures += [keyed[FAILURES], captioned[FAILURES]]
        return CaptionResults(captioned[CAPTIONS],
                              tuple(failures) | "AllFailures" >> beam.Flatten(), captioned[STATS])


class WriteCaptions(beam.PTransform):
    """Write ``CaptionResults`` as the CLI writes its outputs, into ``output_dir``.

    Example::

        results | bc.WriteCaptions("gs://bucket/run1", config)

    Writes ``captions-SSSSS-of-NNNNN.jsonl`` and ``failures-SSSSS-of-NNNNN.jsonl`` (or
    ``.json``, ``.parquet``, ``.gz``: see ``output_format``, ``compression``), exactly once
    each, then ``summary.json`` after the last record. Files of the same names are
    replaced; an output directory holding another run's shards should be emptied first.
    Returns the names of the files written.
    """

    def __init__(self, output_dir: str, config: CaptionConfig, *, num_shards: int = 0,
                 output_format: str = "jsonl", compression: str = "none",
                 started_at: float | None = None):
        """Say where and how to write.

        Args:
            output_dir: A local directory or a URL (gs://, s3://).
            config: The config the results were made with (summary.json shows its settings
                and prices the tokens at its ``price_per_million_*``).
            num_shards: Shards per file set (0: the runner decides).
            output_format: ``jsonl``, ``json`` (an array per shard) or ``parquet``.
            compression: ``none`` or ``gzip`` (jsonl and json).
            started_at: ``time.time()`` when the job started, for summary.json's wall time
                and images per second (default: when this transform is made).
        """
        super().__init__()
        worker = config.worker_config()
        self._output_dir = output_dir
        self._image_key = config.image_key
        self._output_keys = worker.output_keys
        self._num_shards = num_shards
        self._output_format = output_format
        self._compression = compression
        self._started_at = time.time() if started_at is None else started_at
        self._reported = {**config.reported(), "output": redact_url(output_dir),
                          "num_shards": num_shards, "output_format": output_format,
                          "output_compression": compression}

    def _write(self, prefix: str) -> WriteRecords:
        return WriteRecords(self._output_dir, prefix, self._num_shards, False,
                            self._output_format, self._compression, self._image_key,
                            self._output_keys)

    def expand(self, results: CaptionResults) -> beam.PCollection[str]:
        captions = results.captions | "WriteCaptions" >> self._write(CAPTIONS_PREFIX)
        failures = results.failures | "WriteFailures" >> self._write(FAILURES_PREFIX)
        summary = {CAPTIONS: results.captions, FAILURES: results.failures,
                   STATS: results.stats} | "WriteSummary" >> WriteSummary(
            self._output_dir, self._image_key, self._reported, self._started_at,
            self._output_keys)
        return (captions, failures, summary) | "Written" >> beam.Flatten()
