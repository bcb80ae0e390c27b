"""The public API (``import beam_caption as bc``) in-process, against the bundled fake server."""

from __future__ import annotations

import argparse
import json

import apache_beam as beam
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from conftest import make_dataset, make_image, read_jsonl

import beam_caption as bc
from beam_caption.cli.config import caption_config
from beam_caption.cli.flags import CaptionOptions
from beam_caption.core.errors import UsageError
from beam_caption.core.identity import record_fingerprint
from beam_caption.core.records import content_key
from beam_caption.testing import FakeVLMServer

REQUIRED = ["--input", "in.jsonl", "--output", "out", "--api_url", "http://h/v1", "--model", "m"]
# The CLI's flags that are about the launch and the outputs, not about a request: every other
# flag must be a CaptionConfig field (a new flag goes in one list or the other).
LAUNCH_FLAGS = {
    "input", "output", "num_shards", "output_format", "output_compression", "report",
    "max_failure_rate", "no_progress", "resume", "overwrite", "checkpoint_interval", "mode",
    "batch_max_requests", "batch_max_bytes", "batch_poll_interval", "batch_max_wait_hours",
    "batch_max_result_bytes", "retry_failed", "fallback", "skip_preflight", "copy_images"}


def manifest_records(data) -> list[dict]:
    return [record for manifest in data.manifests for record in map(json.loads, open(manifest))]


@pytest.fixture(scope="module")
def server():
    with FakeVLMServer() as running:
        yield running


def test_every_config_field_is_the_cli_flag_of_that_name_with_its_default():
    options = PipelineOptions(REQUIRED).view_as(CaptionOptions)  # only the required flags
    config = bc.CaptionConfig(api_url="http://h/v1", model="m")
    parser = argparse.ArgumentParser(add_help=False)
    CaptionOptions._add_argparse_args(parser)
    flags = {action.dest for action in parser._actions}
    fields = set(bc.CaptionConfig.flag_names())
    assert fields <= flags
    assert flags - fields == LAUNCH_FLAGS
    for name in sorted(fields - {"api_url", "model"}):
        assert getattr(config, name) == getattr(options, name), name
    # the CLI's worker configuration is the config's, made from the flags of its fields
    assert caption_config(options) == config.worker_config()


def test_the_config_refuses_contradictions_and_takes_prompts_in_code():
    prompts = bc.parse_prompts({"short": "Describe it in five words.",
                                "long": {"prompt": "Describe it.", "output_key": "details"}})
    config = bc.CaptionConfig(api_url="http://h/v1", model="m", prompts=prompts)
    assert config.worker_config().output_keys == ["short", "details"]
    assert config.reported()["prompts"] == ["short", "long"]
    for contradiction in ({"prompt": "p", "prompts": prompts},
                          {"prompt": "p", "prompts_file": "prompts.yaml"},
                          {"api_key_file": "k",
                           "api_key_secret": "projects/p/secrets/s/versions/1"},
                          {"max_cost": 1.0}):
        with pytest.raises(UsageError):
            bc.CaptionConfig(api_url="http://h/v1", model="m", **contradiction)


def test_every_public_name_is_there_and_documented():
    for name in bc.__all__:
        value = getattr(bc, name)
        assert name == "DEFAULT_SYSTEM_PROMPT" or value.__doc__, name
    assert set(bc.__all__) <= set(dir(bc))


def test_the_api_example_captions_records_and_writes_them_as_the_cli(tmp_path, server):
    data = make_dataset(tmp_path / "data", 5, files=1, bad_records=True)
    records = manifest_records(data)
    config = bc.CaptionConfig(api_url=server.url, model="fake-vlm", image_root=str(data.root))
    out = tmp_path / "out"
    with TestPipeline(runner="FnApiRunner") as p:
        results = p | beam.Create(records) | bc.CaptionRecords(config)
        _ = results | bc.WriteCaptions(str(out), config)
        assert_that(results.captions | beam.Map(lambda c: (c["id"], c["caption"])),
                    equal_to(list(data.expected.items())), label="captions")
        assert_that(results.failures | beam.Map(lambda f: (f["record"]["id"],
                                                           f["error"]["type"])),
                    equal_to(list(data.bad.items())), label="failures")
    digest = config.worker_config().settings_digest
    captions = read_jsonl(str(out / "captions-*.jsonl"))
    by_id = {record["id"]: record for record in records}
    for caption in captions:  # the record, its caption and caption_meta: nothing else
        record = by_id[caption["id"]]
        assert set(caption) == {*record, "caption", "caption_meta"}
        meta = caption["caption_meta"]
        assert meta["key"] == content_key(record)  # plain records are keyed by content
        assert meta["fingerprint"] == record_fingerprint(record, digest)
        assert meta["model"] == "fake-vlm"
    failures = read_jsonl(str(out / "failures-*.jsonl"))
    assert sorted(f["record"]["id"] for f in failures) == sorted(data.bad)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["records"], summary["captioned"], summary["failed"]) == (7, 5, 2)
    assert summary["failed_by_type"] == {"image/image_not_found": 1,
                                         "request/content_policy": 1}
    assert summary["options"]["model"] == "fake-vlm"
    assert summary["output_keys"] == ["caption"]


def test_read_manifests_feed_caption_records_with_their_read_failures(tmp_path, server):
    data = make_dataset(tmp_path / "data", 3, files=1)
    manifest = data.manifests[0]
    with open(manifest, "a") as handle:
        handle.write("{not json\n")
    config = bc.CaptionConfig(api_url=server.url, model="fake-vlm", image_root=str(data.root))
    with TestPipeline(runner="FnApiRunner") as p:
        results = p | bc.ReadManifests(str(tmp_path / "data" / "*.jsonl")) | bc.CaptionRecords(
            config, key_field="id")  # keyed records keep their FILE#INDEX keys
        assert_that(results.captions | beam.Map(lambda c: (c["caption_meta"]["key"],
                                                           c["caption"])),
                    equal_to([(f"{manifest}#{i}", data.expected[f"r{i}"]) for i in range(3)]),
                    label="captions")
        assert_that(results.failures | beam.Map(lambda f: (f["key"], f["error"]["stage"],
                                                           f["raw"])),
                    equal_to([(f"{manifest}#3", "read", "{not json")]), label="failures")


def test_the_model_handler_gives_each_record_its_caption_or_its_failure(tmp_path, server):
    data = make_dataset(tmp_path / "data", 3, files=1)
    records = manifest_records(data)
    missing = {"id": "missing", "image": "images/nope.png",
               "conversation": [{"from": "human", "value": "q"}]}
    no_id = {"image": records[0]["image"], "conversation": records[0]["conversation"]}
    config = bc.CaptionConfig(api_url=server.url, model="fake-vlm", image_root=str(data.root))
    handler = bc.CaptionModelHandler(config, key_field="id")
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 32}

    def outcome(prediction):
        inference = prediction.inference
        if "error" in inference:
            return (prediction.example.get("id"), inference["key"], inference["error"]["type"])
        assert prediction.model_id == "fake-vlm"
        return (prediction.example["id"], inference["caption_meta"]["key"],
                inference["caption"])

    with TestPipeline(runner="FnApiRunner") as p:
        predictions = (p | beam.Create([*records, missing, no_id])
                       | RunInference(handler))
        assert_that(predictions | beam.Map(outcome), equal_to(
            [(f"r{i}", f"r{i}", data.expected[f"r{i}"]) for i in range(3)]
            + [("missing", "missing", "image_not_found"),
               (None, content_key(no_id), "missing_key_field")]))


def test_checkpoints_let_a_later_run_resume_without_asking_again(tmp_path, server):
    data = make_dataset(tmp_path / "data", 5, files=1)
    records = manifest_records(data)
    config = bc.CaptionConfig(api_url=server.url, model="fake-vlm", image_root=str(data.root))
    out = tmp_path / "out"
    before = server.stats()["requests"]
    with TestPipeline(runner="FnApiRunner") as p:
        results = p | beam.Create(records) | bc.CaptionRecords(
            config, key_field="id", checkpoint_dir=str(out))
        _ = results | bc.WriteCaptions(str(out), config, prefix="caption",
                                       summary_options={"run": "first"})
    assert results.set_aside is None  # not resuming: nothing is set aside
    assert server.stats()["requests"] == before + 5
    # every finished caption was checkpointed; the prefix names the caption files
    checkpointed = read_jsonl(str(out / ".checkpoint" / "part-*.jsonl"))
    assert {c["id"]: c["caption"] for c in checkpointed} == data.expected
    assert [p.name for p in sorted(out.glob("caption*"))] == ["caption-00000-of-00001.jsonl"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["file_name_prefix"] == "caption"
    assert summary["options"]["run"] == "first"

    # the second run drops r0 and adds r5: only r5 is asked; r0's caption is set aside
    new_image, new_caption = make_image(data.root, 5)
    added = {"id": "r5", "image": [new_image],
             "conversation": [{"from": "human", "value": "Describe image 5."}]}
    before = server.stats()["requests"]
    with TestPipeline(runner="FnApiRunner") as p:
        results = p | beam.Create([*records[1:], added]) | bc.CaptionRecords(
            config, key_field="id", checkpoint_dir=str(out), resume=True)
        _ = results | bc.WriteCaptions(str(out), config)
        assert_that(results.captions | beam.Map(lambda c: (c["id"], c["caption"])),
                    equal_to([*((f"r{i}", data.expected[f"r{i}"]) for i in range(1, 5)),
                              ("r5", new_caption)]), label="captions")
        assert_that(results.set_aside | beam.Map(lambda c: c["id"]), equal_to(["r0"]),
                    label="set_aside")
    assert server.stats()["requests"] == before + 1
    earlier = {c["id"]: c["caption_meta"] for c in checkpointed}
    for caption in read_jsonl(str(out / "captions-*.jsonl")):  # reused as they were made
        assert caption["id"] == "r5" or caption["caption_meta"] == earlier[caption["id"]]
    assert [c["id"] for c in read_jsonl(str(out / "set_aside-*.jsonl"))] == ["r0"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["captioned"], summary["resumed"], summary["set_aside"]) == (5, 4, 1)


def test_resume_needs_a_checkpoint_dir_and_a_prefix_a_plain_name():
    config = bc.CaptionConfig(api_url="http://h/v1", model="m")
    with pytest.raises(UsageError, match="checkpoint_dir"):
        bc.CaptionRecords(config, resume=True)
    for prefix in ("failures", "set_aside", "a/b", ""):
        with pytest.raises(UsageError, match="prefix"):
            bc.WriteCaptions("out", config, prefix=prefix)


def test_a_config_reads_its_prompts_and_refusal_phrases_files_once(tmp_path, monkeypatch):
    from beam_caption.core import answer_checks, settings

    (tmp_path / "p.yaml").write_text("a: Describe it.\nb: Tag it.\n")
    (tmp_path / "refusals.txt").write_text("no can do\n")
    reads = []
    for module, name in ((settings, "load_prompts_file"),
                         (answer_checks, "load_refusal_phrases")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda path, original=original: (
            reads.append(path), original(path))[1])
    config = bc.CaptionConfig(api_url="http://127.0.0.1:1/v1", model="m",
                              prompts_file=str(tmp_path / "p.yaml"),
                              refusal_phrases_file=str(tmp_path / "refusals.txt"))
    workers = [config.worker_config() for _ in range(3)]
    assert [spec.name for spec in workers[0].prompt_specs] == ["a", "b"]
    assert workers[0].answer_checks.refusal_phrases == ("no can do",)
    assert config.reported()["prompts_file"] == str(tmp_path / "p.yaml")
    assert sorted(reads) == sorted([str(tmp_path / "p.yaml"), str(tmp_path / "refusals.txt")])
