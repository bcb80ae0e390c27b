"""ReadManifestFiles: JSON-array and JSONL manifests, WebDataset shards and Parquet tables in,
one keyed element per record out (records and failures, read by core/inputs.py), each manifest
or shard read by one worker, each table row group by one. The CLI's
job uses it; the public bc.ReadManifests (transforms/library.py) wraps it.
"""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_caption.core.figures import figures_for
from beam_caption.core.inputs import DEFAULT_IMAGE_KEY, ReadUnit, iter_unit, read_units
from beam_caption.core.limits import MAX_IMAGE_BYTES
from beam_caption.core.records import (
    FAILURES,
    METRICS_NAMESPACE,
    RECORDS,
)

_LOG = logging.getLogger(__name__)


class _ReadUnit(beam.DoFn):
    def __init__(self, progress_dir: str | None, image_key: str, max_image_bytes: int):
        self._progress_dir = progress_dir
        self._image_key = image_key
        self._max_image_bytes = max_image_bytes
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._unreadable = Metrics.counter(METRICS_NAMESPACE, "records_unreadable")

    def setup(self):
        self._progress = figures_for(self._progress_dir)  # a local run's live figures

    def process(self, unit: ReadUnit):
        for element in iter_unit(unit, self._image_key, self._max_image_bytes):
            if "error" in element:
                self._unreadable.inc()
                self._progress.add(failed=1)
                yield beam.pvalue.TaggedOutput(FAILURES, element)
            else:
                self._read.inc()
                yield element

    def finish_bundle(self):
        self._progress.flush()


class ReadManifestFiles(beam.PTransform):
    """Read manifest files into keyed record elements, with a ``failures`` side output.

    ``files`` are already-matched file names or URLs (see :func:`match_manifests`). Records
    naming their images are reshuffled so that one big manifest is captioned by every worker;
    records carrying their image bytes (WebDataset samples, table rows) are not: their unit
    (a shard, a row group) is already spread, and a shuffle would hold every image's bytes
    (the local runner keeps a shuffle's elements in memory). Read failures
    count as failed in ``progress_dir``'s live figures (see core/figures.py) when one is given.
    """

    def __init__(self, files: list[str], progress_dir: str | None = None,
                 image_key: str = DEFAULT_IMAGE_KEY, max_image_bytes: int = MAX_IMAGE_BYTES):
        super().__init__()
        self._image_key = image_key
        self._max_image_bytes = max_image_bytes
        if not files:
            raise ValueError("ReadManifestFiles needs at least one file")
        self._files = list(files)
        self._progress_dir = progress_dir

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection[dict]]:
        read = (
            pbegin
            | "ManifestFiles" >> beam.Create(self._files)
            | "ReshuffleFiles" >> beam.Reshuffle()
            | "Units" >> beam.FlatMap(read_units)  # a table's row groups: from its footer
            | "ReshuffleUnits" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(_ReadUnit(
                self._progress_dir, self._image_key, self._max_image_bytes)).with_outputs(
                    FAILURES, main=RECORDS))
        carried, named = read[RECORDS] | "ByImageSource" >> beam.Partition(
            _ByImageSource(), 2)
        records = ((carried, named | "ReshuffleRecords" >> beam.Reshuffle())
                   | "Records" >> beam.Flatten())
        return {RECORDS: records, FAILURES: read[FAILURES]}


class _ByImageSource(beam.PartitionFn):
    """0 for a record carrying its image bytes (a shard's sample, a table row), 1 for one
    naming its images (a manifest line)."""

    def partition_for(self, element, num_partitions, *args, **kwargs):
        return 0 if "images" in element else 1
