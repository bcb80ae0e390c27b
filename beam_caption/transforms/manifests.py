"""ReadManifestFiles: JSON-array and JSONL manifests, WebDataset shards and Parquet tables in,
one keyed element per record out (records and failures, read by core/inputs.py), each manifest
or shard read by one worker, each table row group by one. The CLI's
job uses it; the public bc.ReadManifests (transforms/library.py) wraps it.
"""

from __future__ import annotations

import logging
import pickle

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_caption.core.figures import figures_for
from beam_caption.core.inputs import (
    DEFAULT_IMAGE_KEY,
    MANIFEST,
    ReadUnit,
    input_kind,
    iter_unit,
    read_units,
)
from beam_caption.core.limits import MAX_IMAGE_BYTES
from beam_caption.core.read_ahead import read_ahead
from beam_caption.core.records import (
    FAILURES,
    METRICS_NAMESPACE,
    RECORDS,
)

_LOG = logging.getLogger(__name__)
RESHUFFLE_BATCH = 100  # manifest records per shuffled element
UNITS_PER_CALL = 8  # units a reader takes at once: the next one is opened ahead
READ_AHEAD_BYTES = 32 << 20  # elements read ahead of the captioning, per reader


class _ReadUnits(beam.DoFn):
    """Read a batch of units in order, a thread reading ahead (the next shard opened while
    the current one's samples are captioned); metrics and progress counted here, in the
    bundle's thread."""

    def __init__(self, progress_dir: str | None, image_key: str, max_image_bytes: int):
        self._progress_dir = progress_dir
        self._image_key = image_key
        self._max_image_bytes = max_image_bytes
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._unreadable = Metrics.counter(METRICS_NAMESPACE, "records_unreadable")

    def setup(self):
        self._progress = figures_for(self._progress_dir)  # a local run's live figures

    def process(self, units: list[ReadUnit]):
        def elements():
            for unit in units:
                yield from iter_unit(unit, self._image_key, self._max_image_bytes)

        for element in read_ahead(elements, READ_AHEAD_BYTES):
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

    ``files`` are already-matched file names or URLs (see :func:`match_manifests`). A
    manifest's records are reshuffled, so that one big manifest is captioned by every worker,
    as pickled bytes (the local runner holds a shuffle's elements decoded: a bytes object
    weighs a fraction of a record's dicts). Shards' and tables' records are spread by their
    unit (a shard, a row group) and not shuffled: with no manifest among ``files`` nothing
    stands between reading and captioning, so a sample's image bytes are captioned as they
    are read (the local runner buffers the whole output of a stage that feeds a shuffle or a
    Flatten fed by other stages). Manifests mixed with them are partitioned off (records
    carrying image bytes, or naming their images) and flattened back, which holds the
    carried records there. A reader takes up to UNITS_PER_CALL units at once and a thread reads
    up to READ_AHEAD_BYTES ahead of the captioning (core/read_ahead.py), so the next shard is
    opened while the current one's samples are captioned. Read failures count as failed in
    ``progress_dir``'s live figures (see core/figures.py) when one is given.
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
            | "UnitBatches" >> beam.BatchElements(min_batch_size=1,
                                                  max_batch_size=UNITS_PER_CALL)
            | "ReadFiles" >> beam.ParDo(_ReadUnits(
                self._progress_dir, self._image_key, self._max_image_bytes)).with_outputs(
                    FAILURES, main=RECORDS))
        manifests = {input_kind(file) == MANIFEST for file in self._files}
        if manifests == {False}:  # every record carries its image bytes
            return {RECORDS: read[RECORDS], FAILURES: read[FAILURES]}
        if manifests == {True}:  # every record names its images
            return {RECORDS: read[RECORDS] | "ReshuffleRecords" >> _ReshuffleRecords(),
                    FAILURES: read[FAILURES]}
        carried, named = read[RECORDS] | "ByImageSource" >> beam.Partition(
            _ByImageSource(), 2)
        records = ((carried, named | "ReshuffleRecords" >> _ReshuffleRecords())
                   | "Records" >> beam.Flatten())
        return {RECORDS: records, FAILURES: read[FAILURES]}


class _ReshuffleRecords(beam.PTransform):
    """Reshuffle records in pickled batches of RESHUFFLE_BATCH (a runner that holds a
    shuffle's elements decoded, as the local one does, keeps one bytes object per batch, not
    each record's dicts); the records come out as they went in."""

    def expand(self, records: beam.PCollection[dict]) -> beam.PCollection[dict]:
        return (records
                | "Batch" >> beam.BatchElements(min_batch_size=RESHUFFLE_BATCH,
                                                max_batch_size=RESHUFFLE_BATCH)
                | "Pickle" >> beam.Map(pickle.dumps, pickle.HIGHEST_PROTOCOL).with_output_types(
                    bytes)
                | "Reshuffle" >> beam.Reshuffle()
                | "Unpickle" >> beam.FlatMap(pickle.loads).with_output_types(dict))


class _ByImageSource(beam.PartitionFn):
    """0 for a record carrying its image bytes (a shard's sample, a table row), 1 for one
    naming its images (a manifest line)."""

    def partition_for(self, element, num_partitions, *args, **kwargs):
        return 0 if "images" in element else 1
