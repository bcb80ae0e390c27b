"""The transforms of the public API (``beam_caption.__all__``): records in, captions and failures
out, for a Beam pipeline of the user's own (docs/library.md).

- ``ReadManifests``: manifest files (paths, globs, URLs) -> ``ManifestRecords`` (keyed records
  and read failures);
- ``CaptionRecords``: record dicts from anywhere, or ``ManifestRecords`` -> ``CaptionResults``
  (captions, failures, the caption step's figures and, when resuming, the earlier captions set
  aside), each record exactly once; optionally checkpointed, and resumed from the checkpoints;
- ``WriteCaptions``: ``CaptionResults`` -> the CLI's output files (``captions-*``,
  ``failures-*``, ``set_aside-*``, ``summary.json``).

The CLI's job is these three in a row (transforms/job.py), so what they write is what the CLI
writes. Each is a thin composite over the private steps (transforms/manifests.py, caption.py,
checkpoint.py, skip_done.py, write.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import NamedTuple

import apache_beam as beam

from beam_caption.core.errors import UsageError
from beam_caption.core.inputs import DEFAULT_IMAGE_KEY
from beam_caption.core.limits import MAX_IMAGE_BYTES
from beam_caption.core.manifest_reader import match_manifests
from beam_caption.core.outputs import (
    CAPTIONS_PREFIX,
    FAILURES_PREFIX,
    SET_ASIDE_PREFIX,
    failures_format,
)
from beam_caption.core.records import CAPTIONS, FAILURES, RECORDS, STATS, keyed_record
from beam_caption.core.redact import redact_url
from beam_caption.core.settings import CaptionConfig
from beam_caption.transforms import manifests
from beam_caption.transforms.caption import CaptionImages
from beam_caption.transforms.checkpoint import CheckpointCaptions
from beam_caption.transforms.skip_done import (
    SET_ASIDE,
    SkipDone,
    read_missing_images,
    reused_cost,
)
from beam_caption.transforms.write import WriteRecords, WriteSummary

_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


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
            When resuming, the earlier captions reused for records of this run are among them.
        failures: Each failure record as the CLI writes it: ``{"key", "source", "record" |
            "raw", "error": {"stage", "type", "message", "attempts", "retryable", ...}}``.
        stats: The caption step's figures per bundle (time waited on rate limits, captions
            reused), which ``WriteCaptions`` adds to summary.json; most pipelines ignore it.
        set_aside: When resuming, the earlier captions that no record of this run reuses
            (other content or settings, or a record left out), which ``WriteCaptions`` keeps
            as ``set_aside-*`` for a later resume; None without ``resume`` (nothing is set
            aside, and no file step is added for it).
    """

    captions: beam.PCollection[dict]
    failures: beam.PCollection[dict]
    stats: beam.PCollection[dict]
    set_aside: beam.PCollection[dict] | None = None


class ReadManifests(beam.PTransform):
    """Read JSONL and JSON-array manifests (``.gz`` too), WebDataset tar shards (``.tar``,
    ``.tar.gz``) and Parquet tables (``.parquet``) into keyed records.

    Example::

        read = p | bc.ReadManifests(["data/*.jsonl", "gs://bucket/more.json"])
        results = read | bc.CaptionRecords(config)

    A record's key is ``FILE#INDEX`` (INDEX: its line, array item or table row, from 0), or
    ``SHARD#KEY`` for a WebDataset sample (its record: ``__key__``, ``__url__`` and its
    text members by extension; the image bytes travel beside it, never in it). A line or item
    that cannot be read is a failure record, and reading goes on. Manifest records are
    reshuffled, so that one big manifest is captioned by every worker; samples and rows that
    carry their image bytes are spread by shard and row group instead (no shuffle of the
    bytes).
    """

    def __init__(self, patterns: str | Iterable[str], *, match: bool = True,
                 progress_dir: str | None = None, image_key: str = DEFAULT_IMAGE_KEY,
                 max_image_bytes: int = MAX_IMAGE_BYTES):
        """Match the manifests now, at pipeline construction.

        Args:
            patterns: Paths, globs or URLs (local, gs://, s3://, http(s)://), one or several.
            match: False when ``patterns`` are file names already matched (the CLI matches
                them before it builds the job): they are read as given, and nothing is listed
                now (a dry run touches no storage).
            progress_dir: See ``CaptionRecords``: lines that cannot be read count as failed
                there.
            image_key: In WebDataset shards, the image member's extension (``jpg``; the
                default ``image``: the first of jpg/jpeg/png/webp); in Parquet tables, the
                image column (give the config's ``image_key``).
            max_image_bytes: A shard's image member over this fails its sample unread (give
                the config's ``max_image_bytes``).

        Raises:
            UsageError: A pattern matches no file.
        """
        super().__init__()
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        self._files = match_manifests(patterns) if match else patterns
        self._progress_dir = progress_dir
        self._image_key = image_key
        self._max_image_bytes = max_image_bytes

    def expand(self, pbegin: beam.pvalue.PBegin) -> ManifestRecords:
        read = pbegin | "Read" >> manifests.ReadManifestFiles(
            self._files, self._progress_dir, self._image_key, self._max_image_bytes)
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


def _resumed(_caption: dict) -> dict:
    """A reused caption's count in summary.json (through ``CaptionResults.stats``)."""
    return {"resumed": 1}


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

    To pay once for each answer across runs, checkpoint and resume::

        results = records | bc.CaptionRecords(config, checkpoint_dir="gs://b/run1",
                                              resume=True)
        results | bc.WriteCaptions("gs://b/run1", config)

    Finished captions are saved under ``checkpoint_dir`` while the job runs, so a crash or a
    stop keeps what was paid for; a later run with ``resume=True`` reuses them for the records
    of the same content and settings (matched by fingerprint, never by key), and asks only the
    rest. The CLI clears the checkpoints once its outputs are complete; a pipeline of yours
    may delete ``CHECKPOINT_DIR/.checkpoint/`` once it will not resume.
    """

    def __init__(self, config: CaptionConfig, *, key_field: str | None = None,
                 checkpoint_dir: str | None = None, checkpoint_interval: float = 10.0,
                 resume: bool = False, progress_dir: str | None = None,
                 captioner: beam.PTransform | None = None, copy_images: bool = False):
        """Make the workers' configuration now, at pipeline construction.

        Args:
            config: How to caption; its prompts file is read now, and where the workers find
                the API key decided (the key itself never enters the pipeline).
            key_field: The record field whose value (as text) keys a record, in
                ``caption_meta.key`` and failure records; a record without it is a
                ``read/missing_key_field`` failure. None: the record's content keys it.
            checkpoint_dir: A directory or URL (usually the output directory) whose
                ``.checkpoint/`` folder receives each finished caption while the job runs
                (a small file per flush). None: no checkpoints.
            checkpoint_interval: Seconds between checkpoint flushes of a bundle (a kill loses
                at most this much).
            resume: Reuse the captions checkpointed in ``checkpoint_dir`` (and earlier final
                caption shards the CLI moved there) by an earlier run with the same settings:
                their records are not asked again, they are in ``captions``, their cost counts
                against ``max_cost``, and the earlier captions no record reuses are in
                ``set_aside``. The files are listed now, at pipeline construction.
            progress_dir: A local directory where the workers drop their counts (captioned,
                failed, reused, images, tokens) for a live progress display: the CLI's
                progress line reads them (cli/progress.py). Local runners only: workers on a
                cluster cannot reach the launcher's directory. None: no counts.
            captioner: The step that captions instead of the online requests: keyed records
                in, ``{"captions", "failures", "stats"}`` PCollections out (the CLI's batch
                mode passes CollectBatchResults, which collects Batch API answers and keeps
                its own budget). None: online requests to ``config.api_url``.
            copy_images: Each caption carries its images' bytes, for
                ``WriteCaptions(output_format="webdataset", copy_images=True)``: the bytes the
                caption step read (or the record carried) in the private field
                ``__image_bytes__``, which no output line holds; when resuming, the reused
                captions take theirs from the earlier WebDataset shards, else from the record
                (its bytes, or its image paths read again). Failures never carry them.
                Memory: each caption holds its images until it is written.

        Raises:
            UsageError: ``resume`` without a ``checkpoint_dir``; ``copy_images`` with a
                ``captioner`` (it reads no image bytes to carry).
        """
        super().__init__()
        if resume and checkpoint_dir is None:
            raise UsageError("resume reuses the captions in checkpoint_dir: give one")
        if copy_images and captioner is not None:
            raise UsageError("copy_images carries the bytes the online caption step reads: "
                             "not with a captioner (the CLI's --mode batch)")
        self._config = config.worker_config()
        self._key_field = key_field
        self._checkpoint_dir = checkpoint_dir
        self._checkpoint_interval = checkpoint_interval
        self._resume = resume
        self._progress_dir = progress_dir
        self._captioner = captioner
        self._copy_images = copy_images

    def expand(self, records: beam.PCollection[dict] | ManifestRecords) -> CaptionResults:
        if isinstance(records, ManifestRecords):  # keyed already
            failures, keyed = [records.failures], records.records
        else:
            # declared, not inferred: Beam's inference unions the input's dict type with the
            # keyed dict that holds it, and its Union can make that type contain itself
            split = records | "KeyRecords" >> beam.ParDo(_KeyRecords(
                self._key_field)).with_output_types(dict).with_outputs(FAILURES, main=RECORDS)
            failures, keyed = [split[FAILURES]], split[RECORDS]
        if not self._resume:
            captioned = keyed | "Caption" >> self._caption_step(None)
            captions, stats = self._checkpointed(captioned[CAPTIONS]), captioned[STATS]
            return CaptionResults(captions, self._all_failures(failures, captioned),
                                  stats, None)
        assert self._checkpoint_dir is not None  # __init__ refuses resume without one
        split = keyed | "SkipDone" >> SkipDone(self._checkpoint_dir,
                                               self._config.settings_digest, self._progress_dir,
                                               self._copy_images)
        spent_before = None
        if self._captioner is None and self._config.client.max_cost:  # the job's budget
            spent_before = (split["done"]
                            | "SpentBefore" >> beam.Map(reused_cost, self._config.client)
                            | "Total" >> beam.CombineGlobally(sum))
        captioned = split["todo"] | "Caption" >> self._caption_step(spent_before)
        done = split["done"]
        if self._copy_images:
            done = done | "ImagesOfDone" >> beam.Map(read_missing_images, self._config)
        captions = ((self._checkpointed(captioned[CAPTIONS]), done)
                    | "WithDone" >> beam.Flatten())
        stats = ((captioned[STATS], split["done"] | "ResumedCounts" >> beam.Map(_resumed))
                 | "AllStats" >> beam.Flatten())
        return CaptionResults(captions, self._all_failures(failures, captioned), stats,
                              split[SET_ASIDE])

    def _caption_step(self, spent_before: beam.PCollection | None) -> beam.PTransform:
        return self._captioner or CaptionImages(self._config, spent_before, self._progress_dir,
                                                self._copy_images)

    def _checkpointed(self, captions: beam.PCollection[dict]) -> beam.PCollection[dict]:
        if self._checkpoint_dir is None:
            return captions
        return captions | "Checkpoint" >> CheckpointCaptions(self._checkpoint_dir,
                                                             self._checkpoint_interval)

    @staticmethod
    def _all_failures(failures: list, captioned: dict) -> beam.PCollection[dict]:
        return (*failures, captioned[FAILURES]) | "AllFailures" >> beam.Flatten()


def prefix_problem(prefix: str) -> str | None:
    """What is wrong with ``prefix`` as the caption files' name, or None."""
    if _PREFIX.fullmatch(prefix) and prefix not in (FAILURES_PREFIX, SET_ASIDE_PREFIX):
        return None
    return (f"{prefix!r}: use letters, digits, '_', '.' and '-' (not {FAILURES_PREFIX!r} or "
            f"{SET_ASIDE_PREFIX!r})")


def webdataset_problem(output_format: str, compression: str, copy_images: bool) -> str | None:
    """What is wrong with these output settings for WebDataset shards, or None (in the flags'
    words)."""
    if copy_images and output_format != "webdataset":
        return ("--copy_images writes the images into WebDataset shards: add --output_format "
                "webdataset")
    if output_format == "webdataset" and compression != "none":
        return ("WebDataset shards are written as plain tar (their images are compressed "
                "already); --output_compression is for jsonl and json")
    return None


class WriteCaptions(beam.PTransform):
    """Write ``CaptionResults`` as the CLI writes its outputs, into ``output_dir``.

    Example::

        results | bc.WriteCaptions("gs://bucket/run1", config)

    Writes ``captions-SSSSS-of-NNNNN.jsonl`` and ``failures-SSSSS-of-NNNNN.jsonl`` (or
    ``.json``, ``.parquet``, ``.tar``, ``.gz``: see ``output_format``, ``compression``),
    exactly once each, ``set_aside-*`` when the results hold set-aside captions (resume), then
    ``summary.json`` after the last record. Files of the same names are replaced; an output
    directory holding another run's shards should be emptied first. Returns the names of the
    files written.

    With ``output_format="webdataset"`` the captions (and set-aside captions) are WebDataset
    tar shards, ``captions-SSSSS-of-NNNNN.tar``, that a training data loader reads as they are:
    a sample per caption, ``KEY.json`` (the output line, as jsonl holds it), ``KEY.txt`` (the
    answer under the first output key, as text; JSON text for a structured answer) and, with
    ``copy_images``, its images (``KEY.jpg``, ``.png``, ``.webp``...: the format read from the
    bytes; a second image is ``KEY.1.EXT``). ``KEY`` is the record's ``__key__`` (characters
    other than letters, digits, ``_`` and ``-`` made ``_``), else 16 hex digits of the SHA-256
    of its record key; ``_2``, ``_3``... make a key met again in a shard unique. Failures stay
    JSON lines (``failures-*.jsonl``): a loader of the captioned set wants only captions.
    """

    def __init__(self, output_dir: str, config: CaptionConfig, *, prefix: str = CAPTIONS_PREFIX,
                 num_shards: int = 0, output_format: str = "jsonl", compression: str = "none",
                 started_at: float | None = None, summary_options: dict | None = None,
                 copy_images: bool = False):
        """Say where and how to write.

        Args:
            output_dir: A local directory or a URL (gs://, s3://).
            config: The config the results were made with (summary.json shows its settings
                and prices the tokens at its ``price_per_million_*``).
            prefix: The caption files' name: ``PREFIX-SSSSS-of-NNNNN.jsonl`` (summary.json
                shows it as ``file_name_prefix`` when not ``captions``).
            num_shards: Shards per file set (0: the runner decides).
            output_format: ``jsonl``, ``json`` (an array per shard), ``parquet`` or
                ``webdataset`` (tar shards of captions, failures as jsonl).
            compression: ``none`` or ``gzip`` (jsonl and json).
            started_at: ``time.time()`` when the job started, for summary.json's wall time
                and images per second (default: when this transform is made).
            summary_options: Entries added to summary.json's ``options``, over the config's
                settings and the ones above (the CLI adds its flags).
            copy_images: Write the image bytes each caption carries into its sample
                (``webdataset`` only; the captions of ``CaptionRecords(copy_images=True)``
                carry them; a caption without them is written without an image).

        Raises:
            UsageError: A ``prefix`` that is not a plain file name, or names other outputs;
                ``copy_images`` without ``webdataset``; ``webdataset`` with ``gzip``.
        """
        super().__init__()
        problem = prefix_problem(prefix)
        if problem:
            raise UsageError(f"prefix {problem}")
        problem = webdataset_problem(output_format, compression, copy_images)
        if problem:
            raise UsageError(problem)
        worker = config.worker_config()
        self._output_dir = output_dir
        self._prefix = prefix
        self._image_key = config.image_key
        self._output_keys = worker.output_keys
        self._num_shards = num_shards
        self._output_format = output_format
        self._compression = compression
        self._copy_images = copy_images
        self._started_at = time.time() if started_at is None else started_at
        reported = {**config.reported(), "output": redact_url(output_dir),
                    "num_shards": num_shards, "output_format": output_format,
                    "output_compression": compression}
        if prefix != CAPTIONS_PREFIX:
            reported["file_name_prefix"] = prefix
        self._reported = {**reported, **(summary_options or {})}

    def _write(self, prefix: str, skip_if_empty: bool = False) -> WriteRecords:
        output_format = (failures_format(self._output_format) if prefix == FAILURES_PREFIX
                         else self._output_format)
        return WriteRecords(self._output_dir, prefix, self._num_shards, skip_if_empty,
                            output_format, self._compression, self._image_key,
                            self._output_keys, self._copy_images)

    def _extract_input_pvalues(self, pvalueish):
        """Beam's hook for a transform of several inputs: the results' PCollections, without
        a ``set_aside`` of None (results made without resume)."""
        if not isinstance(pvalueish, CaptionResults):
            return super()._extract_input_pvalues(pvalueish)
        return pvalueish, {name: value for name, value in pvalueish._asdict().items()
                           if value is not None}

    def expand(self, results: CaptionResults) -> beam.PCollection[str]:
        written = [results.captions | "WriteCaptions" >> self._write(self._prefix),
                   results.failures | "WriteFailures" >> self._write(FAILURES_PREFIX)]
        counted = {CAPTIONS: results.captions, FAILURES: results.failures, STATS: results.stats}
        if results.set_aside is not None:
            written.append(results.set_aside | "WriteSetAside" >> self._write(
                SET_ASIDE_PREFIX, skip_if_empty=True))
            counted[SET_ASIDE] = results.set_aside
        written.append(counted | "WriteSummary" >> WriteSummary(
            self._output_dir, self._image_key, self._reported, self._started_at,
            self._output_keys))
        return written | "Written" >> beam.Flatten()
