"""The transforms in-process (TestPipeline + assert_that), the model behind the client seam."""

from __future__ import annotations

import gc
import json
import time

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from conftest import make_dataset, read_jsonl, runtime_config

from beam_caption.core.client import Completion
from beam_caption.core.errors import CaptionError
from beam_caption.core.identity import record_fingerprint
from beam_caption.core.records import CAPTIONS, FAILURES, STATS, record_element
from beam_caption.transforms.caption import CaptionImages
from beam_caption.transforms.checkpoint import CheckpointCaptions, CheckpointWriter, checkpoint_path
from beam_caption.transforms.skip_done import SkipDone
from beam_caption.transforms.write import WriteSummary, read_summary


class ScriptedClient:
    """A model client without HTTP: captions name the prompt; a prompt holding FAIL is refused."""

    def __init__(self, settings, api_key, budget):
        self.settings = settings

    async def complete(self, body: bytes, tokens: int = 0, params=None, check=None) -> Completion:
        prompt = json.loads(body)["messages"][-1]["content"][-1]["text"]
        if "FAIL" in prompt:
            raise CaptionError("request", "http_400", "scripted refusal", attempts=1)
        return Completion(f"caption of {prompt}", "stop", 7, 3, attempts=2, latency_ms=1.0,
                          throttled_s=0.25)

    async def aclose(self) -> None:
        pass


def elements(data, prompts):
    images = [record["image"] for manifest in data.manifests
              for record in map(json.loads, open(manifest))]
    return [record_element("m.jsonl", i, {"id": f"r{i}", "image": images[i],
                                          "conversation": [{"from": "human", "value": prompt}]})
            for i, prompt in enumerate(prompts)]


def test_caption_images_tags_captions_and_failures(tmp_path):
    data = make_dataset(tmp_path / "data", 4, files=1)
    config = runtime_config("http://unused.invalid/v1", data.root, client_factory=ScriptedClient)
    records = elements(data, ["one", "two", "FAIL three", "four"])
    records.append(record_element("m.jsonl", 4, {"id": "r4", "image": "images/none.png",
                                                 "conversation": [{"from": "human",
                                                                   "value": "x"}]}))
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(records) | CaptionImages(config)
        assert_that(out[CAPTIONS] | beam.Map(lambda c: (c["id"], c["caption"],
                                                        c["caption_meta"]["attempts"])),
                    equal_to([("r0", "caption of one", 2), ("r1", "caption of two", 2),
                              ("r3", "caption of four", 2)]), label="captions")
        assert_that(out[FAILURES] | beam.Map(lambda f: (f["record"]["id"], f["error"]["stage"],
                                                        f["error"]["type"])),
                    equal_to([("r2", "request", "http_400"), ("r4", "image", "image_not_found")]),
                    label="failures")
        assert_that(out[STATS] | beam.Map(lambda s: s["throttled_ms"]) | beam.CombineGlobally(sum),
                    equal_to([3 * 250]), label="stats")  # the time the captions waited on limits


def test_skip_done_reuses_by_content_and_sets_the_rest_aside(tmp_path):
    digest = "settings-1"
    kept = {"id": "a", "image": "a.png"}
    edited = {"id": "b", "image": "b.png"}
    figures = {"attempts": 1, "prompt_tokens": 5, "completion_tokens": 2}  # what summaries add
    earlier = [
        {**kept, "caption": "A", "caption_meta": {"key": "old.jsonl#7", **figures,
                                                  "fingerprint": record_fingerprint(kept, digest)}},
        {"id": "b", "image": "b-old.png", "caption": "B", "caption_meta": {
            "key": "m.jsonl#1", **figures, "fingerprint": record_fingerprint({"id": "b"}, digest)}},
    ]
    (tmp_path / ".checkpoint").mkdir()
    with open(checkpoint_path(str(tmp_path), "part-1.jsonl"), "w") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in earlier) + "torn {\n")
    with TestPipeline(runner="FnApiRunner") as p:
        split = (p | beam.Create([record_element("m.jsonl", 0, kept),
                                  record_element("m.jsonl", 1, edited)])
                 | SkipDone(str(tmp_path), digest))
        assert_that(split["done"] | beam.Map(lambda c: (c["caption"], c["caption_meta"]["key"])),
                    equal_to([("A", "m.jsonl#0")]), label="done")  # moved: the new key
        assert_that(split["todo"] | beam.Map(lambda e: e["key"]), equal_to(["m.jsonl#1"]),
                    label="todo")
        assert_that(split["set_aside"] | beam.Map(lambda c: c["caption"]), equal_to(["B"]),
                    label="set_aside")


def test_write_summary_counts_what_was_written(tmp_path):
    meta = {"attempts": 2, "prompt_tokens": 10, "completion_tokens": 4, "reasoning_tokens": 1,
            "cached": False}
    captions = [{"image": ["a", "b"], "caption_meta": meta},
                {"image": "c", "caption_meta": {**meta, "cached": True, "attempts": 0}}]
    failures = [{"error": {"stage": "image", "type": "image_not_found", "attempts": 0}},
                {"error": {"stage": "request", "type": "http_429", "attempts": 3}}]
    with TestPipeline(runner="FnApiRunner") as p:
        {"captions": p | "C" >> beam.Create(captions),
         "failures": p | "F" >> beam.Create(failures),
         "stats": p | "S" >> beam.Create([{"throttled_ms": 1500}, {"throttled_ms": 250}]),
         } | WriteSummary(str(tmp_path), "image", {"model": "m"}, started_at=time.time() - 3)
    summary = read_summary(str(tmp_path))
    assert (summary["records"], summary["captioned"], summary["failed"]) == (4, 2, 2)
    assert summary["images_captioned"] == 3 and summary["cache_hits"] == 1
    assert summary["tokens"] == {"prompt": 10, "completion": 4, "total": 14, "reasoning": 1,
                                 "cached": 0}
    assert summary["failed_by_type"] == {"image/image_not_found": 1, "request/http_429": 1}
    assert summary["retries"] == 1 + 2 and summary["options"] == {"model": "m"}
    assert summary["throttled_s"] == 1.75
    assert 3 <= summary["wall_time_s"] < 60  # written once, complete: from the start to the end
    assert summary["images_per_s"] == round(3 / summary["wall_time_s"], 2)


def test_checkpoint_captions_passes_captions_through_and_saves_them(tmp_path):
    captions = [{"id": i, "caption": f"c{i}", "caption_meta": {"key": f"m#{i}"}} for i in range(5)]
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(captions) | CheckpointCaptions(str(tmp_path), interval_s=3600)
        assert_that(out | beam.Map(lambda c: c["id"]), equal_to(list(range(5))))
    saved = read_jsonl(str(tmp_path / ".checkpoint" / "*.jsonl"))
    assert sorted(c["id"] for c in saved) == list(range(5))


def test_captions_still_buffered_when_a_writer_goes_are_written(tmp_path):
    writer = CheckpointWriter(str(tmp_path), interval_s=3600)
    writer.add({"caption": "paid for", "caption_meta": {"key": "m#0"}})
    del writer  # what happens at the exit of a stopped process, or when a bundle is dropped
    gc.collect()
    saved = read_jsonl(str(tmp_path / ".checkpoint" / "*.jsonl"))
    assert [c["caption"] for c in saved] == ["paid for"]
