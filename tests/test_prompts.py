"""Several prompts per image (--prompts_file) and structured output (JSON schema answers)."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_RUNNER, run_cli

import beam_caption.core.engine
from beam_caption.cli.launcher import run
from beam_caption.core.errors import CaptionError, UsageError
from beam_caption.core.prompts import load_prompts_file, parse_prompts
from beam_caption.core.structured import answer_checker, parse_json_answer
from beam_caption.testing import FakeVLMConfig, FakeVLMServer
from beam_caption.testing.fake_vlm import structured_answer

TAGS_SCHEMA = {"type": "object", "properties": {
    "objects": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "words": {"type": "integer"}, "indoor": {"type": "boolean"}},
    "required": ["objects", "words", "indoor"], "additionalProperties": False}
PROMPTS = {"prompts": {
    "caption": {"prompt": "Describe the image in one sentence."},
    "alt": {"prompt": "Write alt text for a page titled {title}.", "output_key": "alt_text",
            "max_tokens": 60, "temperature": 0},
    "tags": {"system": "You tag images.", "prompt": "Tag it. Note: {note}",
             "schema": TAGS_SCHEMA},
}}


def test_a_prompts_file_parses_with_defaults_and_the_schema_shorthand(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("prompts:\n  caption: Describe it.\n  tags:\n    prompt: 'Tag {title}'\n"
                    "    output_key: labels\n    schema: {type: object, properties: "
                    "{t: {type: string}}}\n")
    caption, tags = load_prompts_file(str(path))
    assert (caption.name, caption.output_key, caption.prompt) == ("caption", "caption",
                                                                 "Describe it.")
    assert caption.response_format is None and not caption.wants_json
    assert tags.output_key == "labels" and tags.wants_json
    assert tags.response_format == {"type": "json_schema", "json_schema": {
        "name": "tags", "schema": {"type": "object", "properties": {"t": {"type": "string"}}},
        "strict": False}}
    assert tags.user_text({"title": "Dusk", "other": 1}) == "Tag Dusk"
    with pytest.raises(CaptionError, match="needs the record's 'title' field"):
        tags.user_text({})
    # JSON works as well, at the top level
    (tmp_path / "p.json").write_text(json.dumps({"a": {"prompt": "x {n}"}}))
    (only,) = load_prompts_file(str(tmp_path / "p.json"))
    assert only.user_text({"n": [1, "two"]}) == 'x [1, "two"]'


@pytest.mark.parametrize("document, message", [
    ({"a": {"promt": "x"}}, "unknown key 'promt' (did you mean 'prompt'?)"),
    ({"a": "x", "b": {"prompt": "y", "output_key": "a"}}, "several prompts write output_key 'a'"),
    ({"a": {"prompt": "x {0}"}}, "placeholder {0} is not a field name"),
    ({"a": {"prompt": "x {a.b}"}}, "placeholder {a.b} is not a field name"),
    ({"a": {"prompt": "x {"}}, "stray brace"),
    ({"a": {"prompt": "x", "output_key": "caption_meta"}}, "reserved"),
    ({"a": {"prompt": "x", "max_tokens": 0}}, "max_tokens must be an integer >= 1"),
    ({"a": {"prompt": "x", "schema": {"type": "objekt"}}}, "not a valid JSON schema"),
    ({"a": {"prompt": "x", "response_format": {"type": "xml"}}}, "response_format.type"),
    ([], "expected a mapping"),
    ({"a|b": "x"}, "holds '|'"),
])
def test_a_wrong_prompts_file_is_refused_naming_what_is_wrong(document, message):
    with pytest.raises(UsageError, match="prompts") as raised:
        parse_prompts(document)
    assert message in str(raised.value)


def test_json_answers_are_parsed_fenced_or_not_and_checked_against_the_schema():
    check = answer_checker(True, TAGS_SCHEMA)
    value = {"objects": ["cat"], "words": 3, "indoor": False}
    assert check(json.dumps(value)) == value
    assert check("```json\n" + json.dumps(value) + "\n```") == value
    with pytest.raises(CaptionError) as raised:
        check(json.dumps({"objects": ["cat"], "words": "three", "indoor": False}))
    assert (raised.value.stage, raised.value.type, raised.value.retryable) == (
        "response", "schema", True)
    assert "at words" in raised.value.message
    with pytest.raises(CaptionError, match="not JSON"):
        parse_json_answer("Sure! Here are the tags: cat")
    with pytest.raises(CaptionError, match="NaN is not a JSON value"):
        parse_json_answer('{"words": NaN}')  # Python's json would take it
    assert answer_checker(False, None) is None


def write_prompts_manifest(data, tmp_path, notes=None):
    """The dataset's records with the fields the prompts' placeholders name."""
    records = []
    for manifest in data.manifests:
        text = open(manifest).read()
        records += json.loads(text) if manifest.endswith(".json") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    for i, record in enumerate(records):
        record["title"] = f"<b>page {record['id']}</b>"
        record["note"] = (notes or {}).get(record["id"], f"note {i}")
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    return path, prompts, records


def test_each_prompt_answers_under_its_own_key_and_each_image_is_prepared_once(
        dataset_factory, tmp_path, monkeypatch):
    data = dataset_factory(12)
    manifest, prompts, records = write_prompts_manifest(data, tmp_path)
    prepared = []
    real_prepare = beam_caption.core.engine.prepare_image_bytes
    monkeypatch.setattr(beam_caption.core.engine, "prepare_image_bytes",
                        lambda *args: prepared.append(1) or real_prepare(*args))
    with FakeVLMServer(FakeVLMConfig(schema_break_first=1)) as server:
        summary = run([*TEST_RUNNER, "--input", str(manifest), "--output", str(tmp_path / "out"),
                       "--api_url", server.url, "--model", "fake-vlm", "--image_root",
                       str(data.root), "--prompts_file", str(prompts), "--max_backoff", "0.01"])
        stats = server.stats()
    assert summary["captioned"] == 12 and summary["failed"] == 0
    assert summary["output_keys"] == ["caption", "alt_text", "tags"]
    assert len(prepared) == 12  # one image each, prepared once for three prompts
    # three prompts a record, the first tags answer of each broke its schema and was retried
    assert stats["requests"] == 12 * 4 and stats["faults"] == {"schema": 12}
    lines = [json.loads(line) for path in sorted((tmp_path / "out").glob("captions-*.jsonl"))
             for line in open(path)]
    for line in lines:
        expected = data.expected[line["id"]]
        assert line["caption"] == line["alt_text"] == expected
        assert line["tags"] == structured_answer(TAGS_SCHEMA, expected)  # JSON, not a string
        meta = line["caption_meta"]
        assert set(meta["prompts"]) == {"caption", "alt", "tags"}
        assert meta["prompts"]["tags"]["attempts"] == 2 and meta["attempts"] == 4
        assert meta["prompt_tokens"] == sum(p["prompt_tokens"] for p in meta["prompts"].values())
        assert line["title"] == f"<b>page {line['id']}</b>"  # the record itself is unchanged
    assert summary["tokens"]["prompt"] == sum(line["caption_meta"]["prompt_tokens"]
                                              for line in lines)


def test_a_failed_prompt_is_recorded_with_the_answers_the_others_gave(
        dataset_factory, tmp_path):
    data = dataset_factory(6)
    manifest, prompts, records = write_prompts_manifest(
        data, tmp_path, notes={"r1": "BREAK_SCHEMA"})
    del next(r for r in records if r["id"] == "r2")["title"]  # only its alt prompt fails
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    with FakeVLMServer() as server:
        result = run_cli([*TEST_RUNNER, "--input", str(manifest), "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--prompts_file", str(prompts), "--max_retries", "1",
                          "--max_backoff", "0.01"], tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    failures = {f["record"]["id"]: f for f in result.failures}
    assert sorted(failures) == ["r1", "r2"] and len(result.captions) == 4
    schema = failures["r1"]
    assert (schema["error"]["stage"], schema["error"]["type"], schema["error"]["prompt"],
            schema["error"]["attempts"]) == ("response", "schema", "tags", 2)
    assert schema["answers"] == {"caption": data.expected["r1"], "alt_text": data.expected["r1"]}
    missing = failures["r2"]
    assert (missing["error"]["type"], missing["error"]["prompt"]) == ("missing_prompt_field",
                                                                      "alt")
    assert missing["answers"]["tags"] == structured_answer(TAGS_SCHEMA, data.expected["r2"])
    assert result.summary["failed_by_type"] == {"read/missing_prompt_field": 1,
                                                "response/schema": 1}


def test_prompts_file_conflicts_and_a_bad_file_are_one_line_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("prompts:\n  a: {prompt: x, tempreature: 1}\n")
    base = [*TEST_RUNNER, "--input", str(tmp_path / "m.jsonl"), "--api_url",
            "http://127.0.0.1:9/v1", "--model", "m", "--skip_preflight"]
    (tmp_path / "m.jsonl").write_text('{"image": "a.png"}\n')
    for extra, message in (
            (["--prompts_file", str(tmp_path / "bad.yaml")],
             "unknown key 'tempreature' (did you mean 'temperature'?)"),
            (["--prompts_file", str(tmp_path / "bad.yaml"), "--prompt", "x"],
             "--prompt or --prompts_file, not both"),
            (["--prompts_file", str(tmp_path / "none.yaml")], "cannot read it")):
        result = run_cli([*base, *extra], tmp_path / "out")
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_retries_are_counted_per_prompt(dataset_factory, tmp_path):
    data = dataset_factory(4, files=1)
    manifest, prompts, _ = write_prompts_manifest(data, tmp_path)
    with FakeVLMServer(FakeVLMConfig(schema_break_first=1)) as server:
        summary = run([*TEST_RUNNER, "--input", str(manifest), "--output", str(tmp_path / "out"),
                       "--api_url", server.url, "--model", "fake-vlm", "--image_root",
                       str(data.root), "--prompts_file", str(prompts), "--max_backoff", "0.01",
                       "--no_progress"])
    # each record's tags prompt was asked twice, the two others once: one retry a record
    assert summary["retries"] == 4 and summary["attempts"] == 4 * 4
