"""ReadManifestFiles: JSON-array and JSONL manifests in, one keyed element per record out
(records and failures, read by core/manifest_reader.py), each file read by one worker. The CLI's
job uses it; the public bc.ReadManifests (transforms/library.py) wraps it.
"""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_caption.core.figures import figures_for
from beam_caption.core.manifest_reader import iter_manifest
from beam_caption.core.records import (
    FAILURES,
    METRICS_NAMESPACE,
    RECORDS,
)

_LOG = logging.getLogger(__name__)


class _ReadManifestFile(beam.DoFn):
    def __init__(self, progress_dir: str | None = None):
        self._progress_dir = progress_dir
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._unreadable = Metrics.counter(METRICS_NAMESPACE, "records_unreadable")

    def setup(self):
        self._progress = figures_for(self._progress_dir)  # a local run's live figures

    def process(self, file: str):
        for element in iter_manifest(file):
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

    ``files`` are already-matched file names or URLs (see :func:`match_manifests`). The
    records are reshuffled so that one big manifest is captioned by every worker. Read failures
    count as failed in ``progress_dir``'s live figures (see core/figures.py) when one is given.
    """

    def __init__(self, files: list[str], progress_dir: str | None = None):
        super().__init__()
        if not files:
            raise ValueError("ReadManifestFiles needs at least one file")
        self._files = list(files)
        self._progress_dir = progress_dir

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection[dict]]:
        read = (
            pbegin
            | "ManifestFiles" >> beam.Create(self._files)
            | "ReshuffleFiles" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(_ReadManifestFile(self._progress_dir)).with_outputs(
                FAILURES, main=RECORDS))
        records = read[RECORDS] | "ReshuffleRecords" >> beam.Reshuffle()
        return {RECORDS: records, FAILURES: read[FAILURES]}
