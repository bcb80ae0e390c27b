"""CaptionManifests: the CLI's job as one composite of the public transforms.

``ReadManifests -> CaptionRecords -> WriteCaptions`` (transforms/library.py), each made by the
launcher from the flags (cli/launcher.Launch); one composite so that the job's steps are named
``CaptionManifests/ReadManifests``, ``CaptionManifests/CaptionImages`` and
``CaptionManifests/WriteCaptions`` (what a dry run lists as its stages).
"""

from __future__ import annotations

import apache_beam as beam

from beam_caption.transforms.library import (
    CaptionRecords,
    CaptionResults,
    ReadManifests,
    WriteCaptions,
)


class CaptionManifests(beam.PTransform):
    """``p | CaptionManifests(read, caption, write)``: read the manifests, caption their
    records, write the outputs; returns the ``CaptionResults`` (written already)."""

    def __init__(self, read: ReadManifests, caption: CaptionRecords, write: WriteCaptions):
        super().__init__()
        self._read = read
        self._caption = caption
        self._write = write

    def expand(self, pbegin: beam.pvalue.PBegin) -> CaptionResults:
        results = pbegin | "ReadManifests" >> self._read | "CaptionImages" >> self._caption
        _ = results | "WriteCaptions" >> self._write
        return results
