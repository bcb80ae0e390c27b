"""ReadManifestFiles' stages after the read: shards and tables go straight on (the local runner
buffers a stage's whole output before the next stage), manifests through a batched reshuffle
that gives back every record as it was, a mix of both through a Flatten."""

import io
import json
import tarfile

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_caption.core.manifest_reader import iter_manifest
from beam_caption.core.webdataset import write_sample
from beam_caption.transforms.manifests import RESHUFFLE_BATCH, ReadManifestFiles


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()


def write_shard(path, keys) -> str:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            write_sample(tar, key, {"png": PNG, "txt": key.encode()})
    return str(path)


def write_manifest(path, count: int) -> str:
    path.write_text("".join(json.dumps({"image": [f"img{i}.png"], "n": i, "f": i / 3,
                                        "nested": {"list": [i, None, "é"]}}) + "\n"
                            for i in range(count)))
    return str(path)


def producer_label(pcoll: beam.PCollection) -> str:
    return pcoll.producer.full_label


def test_shards_alone_are_captioned_as_read(tmp_path):
    shard = write_shard(tmp_path / "a.tar", ["k0", "k1", "k2"])
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | "Read" >> ReadManifestFiles([shard])
        assert producer_label(out["records"]).startswith("Read/ReadFiles/")  # nothing after
        assert_that(out["records"] | beam.Map(lambda e: (e["key"], e["images"])),
                    equal_to([(f"{shard}#k{i}", [PNG]) for i in range(3)]))


def test_manifest_records_come_out_of_the_reshuffle_as_they_went_in(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", 2 * RESHUFFLE_BATCH + 7)
    expected = [json.dumps(e, sort_keys=True) for e in iter_manifest(manifest)]
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | "Read" >> ReadManifestFiles([manifest])
        assert producer_label(out["records"]).startswith("Read/ReshuffleRecords/")
        assert_that(out["records"] | beam.Map(json.dumps, sort_keys=True), equal_to(expected))


def test_manifests_mixed_with_shards_give_every_record(tmp_path):
    shard = write_shard(tmp_path / "a.tar", ["k0"])
    manifest = write_manifest(tmp_path / "m.jsonl", 3)
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | "Read" >> ReadManifestFiles([shard, manifest])
        assert producer_label(out["records"]) == "Read/Records"
        assert_that(out["records"] | beam.Map(lambda e: (e["key"], "images" in e)),
                    equal_to([(f"{shard}#k0", True)]
                             + [(f"{manifest}#{i}", False) for i in range(3)]))
