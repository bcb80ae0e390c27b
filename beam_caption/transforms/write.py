"""Sinks: sharded captions and failures (exactly-once files; formats in core/outputs.py) and
summary.json, written once, complete (figures in core/summary.py).
"""

from __future__ import annotations

import json
import tarfile
import time
from collections import Counter

import apache_beam as beam
import fsspec
from apache_beam import coders
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_caption.core.caption_shards import shard_keys, write_caption
from beam_caption.core.outputs import SUMMARY_FILE, file_suffix, parquet_row, parquet_schema
from beam_caption.core.records import without_image_bytes
from beam_caption.core.summary import caption_counts, failure_counts, summary_from_counts

SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
_NO_EMPTY_UPLOADS = ("s3://",)  # Beam's writer makes an empty file a refused multipart upload


def output_path(output_dir: str, name: str) -> str:
    return f"{output_dir.rstrip('/')}/{name}"


def match_files(pattern: str) -> list[str]:
    """The files matching ``pattern`` on any Beam filesystem."""
    return [m.path for result in FileSystems.match([pattern]) for m in result.metadata_list]


def to_json_line(element: dict) -> str:
    """An element as one line of JSON; image bytes it carries are left out (never written)."""
    return json.dumps(without_image_bytes(element), ensure_ascii=False, separators=(",", ":"))


class WriteRecords(beam.PTransform):
    """Write dicts as ``OUTDIR/PREFIX-SSSSS-of-NNNNN`` + the format's suffix (core/outputs.py):
    JSON lines, a JSON array per shard, Parquet, or WebDataset tar shards (captions only);
    returns the final file names.

    Files are exactly-once (Beam's temp files renamed at finalize). An empty set is one file
    of no records (``PREFIX-00000-of-00001...``) unless ``skip_if_empty``. On S3, where Beam
    would upload an empty file as a multipart upload of no parts (which S3 refuses, failing the
    job at its very end), an empty JSON-lines file is written with one plain PUT instead.
    ``image_key`` and ``output_keys`` fill Parquet's image and answers columns; the first
    output key is a WebDataset sample's ``.txt``, and ``copy_images`` adds the image bytes a
    caption carries as its image members (core/caption_shards.py).
    """

    def __init__(self, output_dir: str, prefix: str, num_shards: int = 0,
                 skip_if_empty: bool = False, output_format: str = "jsonl",
                 compression: str = "none", image_key: str = "image",
                 output_keys: list[str] | None = None, copy_images: bool = False):
        super().__init__()
        self._path = output_path(output_dir, prefix)
        self._num_shards = num_shards
        self._skip_if_empty = skip_if_empty
        self._format = output_format
        self._compression = compression
        self._image_key = image_key
        self._output_keys = output_keys or ["caption"]
        self._copy_images = copy_images

    def expand(self, elements: beam.PCollection[dict]) -> beam.PCollection[str]:
        suffix = file_suffix(self._format, self._compression)
        if self._format == "parquet":
            return (elements
                    | "ToRows" >> beam.Map(parquet_row, self._image_key, self._output_keys)
                    | "Write" >> beam.io.WriteToParquet(
                        self._path, parquet_schema(), file_name_suffix=suffix,
                        num_shards=self._num_shards, shard_name_template=SHARD_TEMPLATE,
                        codec="snappy"))
        if self._format == "webdataset":
            return elements | "Write" >> beam.io.Write(_WebDatasetSink(
                self._path, suffix, self._num_shards, self._output_keys, self._copy_images,
                self._skip_if_empty))
        empty_by_hand = (self._format == "jsonl" and self._compression == "none"
                         and not self._skip_if_empty and self._path.startswith(_NO_EMPTY_UPLOADS))
        sink = _JsonArraySink if self._format == "json" else _JsonLinesSink
        files = (elements
                 | "ToJson" >> beam.Map(to_json_line)
                 | "Write" >> beam.io.Write(sink(
                     self._path, suffix, self._num_shards, self._compression,
                     skip_if_empty=self._skip_if_empty or empty_by_hand)))
        if empty_by_hand:
            _ = (files
                 | "CountFiles" >> beam.combiners.Count.Globally()
                 | "WriteIfEmpty" >> beam.Map(_write_empty_file_set,
                                              f"{self._path}-00000-of-00001{suffix}"))
        return files


class _JsonLinesSink(filebasedsink.FileBasedSink):
    """One JSON text per line (what WriteToText writes), optionally gzip-compressed."""

    def __init__(self, path: str, suffix: str, num_shards: int, compression: str,
                 skip_if_empty: bool):
        super().__init__(path, coder=coders.StrUtf8Coder(), file_name_suffix=suffix,
                         num_shards=num_shards, shard_name_template=SHARD_TEMPLATE,
                         mime_type="application/json", skip_if_empty=skip_if_empty,
                         compression_type=(CompressionTypes.GZIP if compression == "gzip"
                                           else CompressionTypes.UNCOMPRESSED))

    def write_encoded_record(self, file_handle, encoded_value: bytes) -> None:
        file_handle.write(encoded_value + b"\n")


class _ArrayFile:
    """A shard file being written as a JSON array, and whether it holds an element yet."""

    def __init__(self, handle):
        self.handle = handle
        self.started = False


class _JsonArraySink(_JsonLinesSink):
    """A JSON array per shard, one element per line: ``[``, ``{...},``, ``{...}``, ``]``."""

    def open(self, temp_path: str):
        handle = super().open(temp_path)
        handle.write(b"[")
        return _ArrayFile(handle)

    def write_encoded_record(self, file_handle: _ArrayFile, encoded_value: bytes) -> None:
        file_handle.handle.write((b",\n" if file_handle.started else b"\n") + encoded_value)
        file_handle.started = True

    def close(self, file_handle: _ArrayFile) -> None:
        file_handle.handle.write(b"\n]\n")
        super().close(file_handle.handle)


class _TarShard:
    """A shard file being written as a tar stream, and the sample keys it holds."""

    def __init__(self, handle):
        self.handle = handle
        self.tar = tarfile.open(fileobj=handle, mode="w|")
        self.keys = shard_keys()


class _WebDatasetSink(filebasedsink.FileBasedSink):
    """A tar stream per shard, a sample per caption (core/caption_shards.py): the caption's
    JSON line, its text and, with ``copy_images``, the image bytes it carries."""

    def __init__(self, path: str, suffix: str, num_shards: int, output_keys: list[str],
                 copy_images: bool, skip_if_empty: bool):
        super().__init__(path, coder=coders.PickleCoder(), file_name_suffix=suffix,
                         num_shards=num_shards, shard_name_template=SHARD_TEMPLATE,
                         mime_type="application/x-tar", skip_if_empty=skip_if_empty,
                         compression_type=CompressionTypes.UNCOMPRESSED)
        self._output_keys = output_keys
        self._copy_images = copy_images

    def open(self, temp_path: str):
        return _TarShard(super().open(temp_path))

    def write_record(self, file_handle: _TarShard, value: dict) -> None:
        write_caption(file_handle.tar, file_handle.keys, value, to_json_line(value),
                      self._output_keys, self._copy_images)

    def close(self, file_handle: _TarShard) -> None:
        file_handle.tar.close()  # the end-of-archive blocks; the handle stays open
        super().close(file_handle.handle)


def _write_empty_file_set(files_written: int, path: str) -> None:
    if files_written == 0:
        with fsspec.open(path, "wb"):
            pass  # one PUT of no bytes


class _SummaryFn(beam.CombineFn):
    """Counts, tokens and failures by stage/type over captions and failures."""

    def create_accumulator(self):
        return Counter()

    def add_input(self, accumulator, counts):
        accumulator.update(counts)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = Counter()
        for accumulator in accumulators:
            merged.update(accumulator)
        return merged

    def extract_output(self, accumulator):
        return dict(accumulator)


def write_summary(summary: dict, output_dir: str) -> str:
    path = output_path(output_dir, SUMMARY_FILE)
    with FileSystems.create(path) as handle:
        handle.write((json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def read_summary(output_dir: str) -> dict:
    with FileSystems.open(output_path(output_dir, SUMMARY_FILE)) as handle:
        return json.loads(handle.read().decode("utf-8"))


class WriteSummary(beam.PTransform):
    """Combine captions and failures into ``OUTDIR/summary.json`` (exact, runner-independent).

    Applied to ``{"captions", "failures"[, "resumed", "set_aside", "stats"]}``; ``resumed``
    holds the captions carried over from an earlier run (they are also inside ``captions``),
    ``set_aside`` the earlier captions this run did not reuse, ``stats`` the caption step's
    per-bundle figures (records.STATS). ``started_at`` (``time.time()`` when the job started)
    gives wall time and images/s; the summary is written once, after the last record.
    """

    def __init__(self, output_dir: str, image_key: str, options: dict,
                 started_at: float | None = None, output_keys: list[str] | None = None):
        super().__init__()
        self._output_keys = output_keys
        self._output_dir = output_dir
        self._image_key = image_key
        self._options = options
        self._started_at = started_at

    def expand(self, outputs: dict[str, beam.PCollection[dict]]) -> beam.PCollection[str]:
        image_key, output_dir, options = self._image_key, self._output_dir, self._options
        started_at, output_keys = self._started_at, self._output_keys
        per_record = {"Caption": (outputs["captions"], beam.Map(caption_counts, image_key)),
                      "Failure": (outputs["failures"], beam.Map(failure_counts))}
        for name in ("resumed", "set_aside"):
            if name in outputs:
                per_record[name.title()] = (outputs[name], beam.Map(
                    lambda _, name=name: {name: 1}).with_output_types(dict))
        # Each input summed where it is made (a lifted combine: one count per bundle), not
        # after the Flatten, which the local runner would fill with a dict per record first.
        counts = [records | f"{label}Counts" >> to_counts
                  | f"{label}Totals" >> beam.CombineGlobally(_SummaryFn()).without_defaults()
                  .with_output_types(dict)
                  for label, (records, to_counts) in per_record.items()]
        if "stats" in outputs:
            counts.append(outputs["stats"])
        return (
            counts
            | "AllCounts" >> beam.Flatten()
            # declared, not inferred: Beam's inference of these nested dicts can recurse
            | "Combine" >> beam.CombineGlobally(_SummaryFn()).with_output_types(dict)
            | "Write" >> beam.Map(lambda counts: write_summary(summary_from_counts(
                counts, options, None if started_at is None else time.time() - started_at,
                output_keys), output_dir)).with_output_types(str))
