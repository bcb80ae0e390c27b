"""Stages of a prompts file: prompts using other prompts' answers, per-prompt models, judges
that send low-scoring answers to a stronger model (core/stages.py), and their cost."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_RUNNER, run_cli

from beam_caption.core.errors import UsageError
from beam_caption.core.prompts import ModelRoute, parse_prompts
from beam_caption.testing import FakeVLMConfig, FakeVLMServer
from beam_caption.testing.fake_vlm import JUDGE_SCORES, STRONG_CAPTION

SCORE = {"type": "object", "properties": {"score": {"type": "number"}}, "required": ["score"]}


def judged_prompts(**judge) -> dict:
    return {"prompts": {
        "verdict": {"prompt": "Score this caption from 1 to 10: {caption}. {note}",
                    "judge": "caption", "schema": SCORE, "model": "judge-vlm",
                    "price_per_million_input_tokens": 1, "price_per_million_output_tokens": 1,
                    **judge},
        "caption": {"prompt": "Describe the image."},
    }}


def test_placeholders_naming_prompts_order_them_and_others_are_record_fields():
    specs = parse_prompts({
        "french": {"prompt": "Translate to French: {summary}", "model": "small",
                   "image": False, "max_tokens": 80, "temperature": 0,
                   "reasoning_effort": "low"},
        "summary": {"prompt": "Summarise in 5 words: {long}. Title: {title}",
                    "output_key": "short"},
        "long": {"prompt": "Describe {long} in detail."},  # itself: the record's field
    })
    assert [spec.name for spec in specs] == ["long", "summary", "french"]
    long, summary, french = specs
    assert long.inputs == () and long.needs == ()
    assert summary.inputs == (("long", "long"),) and french.inputs == (("summary", "summary"),)
    assert french.route == ModelRoute("small") and not french.image
    assert french.request_params() == {"max_completion_tokens": 80, "temperature": 0.0,
                                       "reasoning_effort": "low"}
    assert summary.user_text({"title": "Dusk", "long": "field"}, {"long": "A cat."}) == \
        "Summarise in 5 words: A cat.. Title: Dusk"
    # by output key too; a JSON answer is filled in as JSON
    (tags, alt) = parse_prompts({"tags": {"prompt": "Tag it", "output_key": "labels",
                                          "schema": {"type": "object"}},
                                 "alt": "Alt text using {labels}"})
    assert alt.inputs == (("labels", "tags"),)
    assert alt.user_text({}, {"tags": {"a": 1}}) == 'Alt text using {"a": 1}'


@pytest.mark.parametrize("document, message", [
    ({"a": "x {b}", "b": "y {c}", "c": "z {a}"}, "wait for each other's answers: a -> b -> c -> a"),
    ({"a": {"prompt": "x {caption}", "judge": "nope", "schema": SCORE}},
     "judge 'nope' names no other prompt"),
    ({"caption": "c", "j": {"prompt": "x", "judge": "caption", "schema": SCORE}},
     "must show the answer it judges: put {caption} in it"),
    ({"caption": "c", "j": {"prompt": "x {caption}", "judge": "caption"}},
     "a judge needs a schema requiring a number score from 1 to 10"),
    ({"caption": "c", "j": {"prompt": "x {caption}", "judge": "caption",
                            "schema": {"type": "object", "properties": {"score": {
                                "type": "string"}}, "required": ["score"]}}},
     "a judge needs a schema requiring a number score"),
    ({"caption": "c", "j": {"prompt": "x {caption}", "judge": "caption", "schema": SCORE,
                            "threshold": 11, "recaption": "big"}}, "threshold must be a score"),
    ({"caption": "c", "j": {"prompt": "x {caption}", "judge": "caption", "schema": SCORE,
                            "threshold": 5}}, "give threshold and recaption together"),
    ({"caption": "c", "j": {"prompt": "x {caption}", "judge": "caption", "schema": SCORE,
                            "threshold": 5, "recaption": {"modle": "big"}}},
     "unknown key 'modle' (did you mean 'model'?)"),
    ({"caption": "c", "j": {"prompt": "x {caption}", "judge": "caption", "schema": SCORE,
                            "threshold": 5, "recaption": {"api_url": "http://x/v1"}}},
     "needs the model to ask"),
    ({"caption": "c", "j": {"prompt": "x {caption}", "judge": "caption", "schema": SCORE},
      "k": {"prompt": "y {caption}", "judge": "caption", "schema": SCORE}},
     "'caption' has another judge, 'k'"),
    ({"caption": {"prompt": "c", "threshold": 3}}, "threshold and recaption belong to a judge"),
    ({"caption": {"prompt": "c", "price_per_million_input_tokens": 3}},
     "prices need the prompt's own model"),
    ({"caption": {"prompt": "c", "image": "no"}}, "image must be true or false"),
    # an infinite price or temperature (YAML's .inf) would make every cost infinite
    ({"caption": {"prompt": "c", "model": "m", "price_per_million_input_tokens": float("inf")}},
     "price_per_million_input_tokens must be a number >= 0, got inf"),
    ({"caption": {"prompt": "c", "temperature": float("nan")}},
     "temperature must be a number >= 0, got nan"),
    # a prompt using the judged answer waits for its judge: a judge using it is a cycle
    ({"caption": "c", "j": {"prompt": "x {caption} {alt}", "judge": "caption",
                            "schema": SCORE}, "alt": "y {caption}"},
     "wait for each other's answers: j -> alt -> j"),
])
def test_wrong_stages_are_refused_at_launch_naming_what_is_wrong(document, message):
    with pytest.raises(UsageError) as raised:
        parse_prompts(document)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_judge_with_a_recaption_model_parses():
    caption, verdict = parse_prompts(judged_prompts(threshold=5, recaption={
        "model": "strong-vlm", "api_url": "http://127.0.0.1:1/v1", "api_key_env": "STRONG_KEY",
        "price_per_million_input_tokens": 10, "max_tokens": 300}))
    assert caption.name == "caption" and verdict.judge_of == "caption"
    assert verdict.threshold == 5.0 and verdict.needs == ("caption",)
    assert verdict.recaption == ModelRoute("strong-vlm", "http://127.0.0.1:1/v1", "STRONG_KEY",
                                           price_per_million_input_tokens=10, max_tokens=300)


def write_job(data, tmp_path, prompts: dict, notes: dict | None = None):
    """The dataset's records with a ``note`` each (``notes``: id -> note), and the prompts
    file."""
    records = []
    for manifest in data.manifests:
        text = open(manifest).read()
        records += (json.loads(text) if manifest.endswith(".json")
                    else [json.loads(line) for line in text.splitlines()])
    for record in records:
        record["note"] = (notes or {}).get(record["id"], "")
    manifest = tmp_path / "records.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    return manifest, path


def test_a_judge_sends_low_scores_to_a_strong_model_on_its_own_endpoint(dataset_factory,
                                                                       tmp_path):
    data = dataset_factory(6)
    manifest, prompts = write_job(data, tmp_path, judged_prompts(threshold=5, recaption={
        "model": "strong-vlm", "price_per_million_input_tokens": 100,
        "price_per_million_output_tokens": 100, "api_key_env": "STRONG_KEY",
        "api_url": "STRONG_URL"}), notes={"r1": "LOW_SCORE", "r4": "LOW_SCORE"})
    with FakeVLMServer(FakeVLMConfig(models=("fake-vlm", "judge-vlm"))) as small, \
            FakeVLMServer(FakeVLMConfig(models=("strong-vlm",), api_key="sk-strong")) as strong:
        prompts.write_text(prompts.read_text().replace("STRONG_URL", strong.url))
        result = run_cli([*TEST_RUNNER, "--input", str(manifest), "--api_url", small.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--prompts_file", str(prompts), "--price_per_million_input_tokens",
                          "2", "--price_per_million_output_tokens", "4"], tmp_path / "out",
                         env={"STRONG_KEY": "sk-strong"})
        strong_requests = strong.stats()["requests"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.failures
    lines = {line["id"]: line for line in result.captions}
    assert len(lines) == 6 and strong_requests == 2
    for key, line in lines.items():
        quality = line["caption_meta"]["quality"]
        expected = data.expected[key]
        if key in ("r1", "r4"):
            assert line["caption"] == expected.replace("A fake caption: ", STRONG_CAPTION)
            assert quality == {"judge": "verdict", "of": "caption",
                               "score": JUDGE_SCORES["strong"], "threshold": 5.0,
                               "recaptioned": True, "first_answer": expected,
                               "first_score": JUDGE_SCORES["low"], "first_model": "fake-vlm",
                               "model": "strong-vlm"}
            assert line["verdict"] == {"score": JUDGE_SCORES["strong"]}
            assert set(line["caption_meta"]["tokens_by_model"]) == {
                "fake-vlm", "judge-vlm", "strong-vlm"}
        else:
            assert line["caption"] == expected
            assert quality == {"judge": "verdict", "of": "caption",
                               "score": JUDGE_SCORES["fine"], "threshold": 5.0,
                               "recaptioned": False, "model": "fake-vlm"}
            assert set(line["caption_meta"]["tokens_by_model"]) == {"fake-vlm", "judge-vlm"}
    summary = result.summary
    by_model = summary["cost"]["by_model"]
    tokens = {model: {side: sum(line["caption_meta"]["tokens_by_model"].get(model, {}).get(
        f"{side}_tokens", 0) for line in lines.values()) for side in ("prompt", "completion")}
        for model in ("fake-vlm", "judge-vlm", "strong-vlm")}
    prices = {"fake-vlm": (2, 4), "judge-vlm": (1, 1), "strong-vlm": (100, 100)}
    for model, (price_in, price_out) in prices.items():
        dollars = (tokens[model]["prompt"] * price_in
                   + tokens[model]["completion"] * price_out) / 1e6
        assert by_model[model]["total"] == pytest.approx(dollars, abs=1e-6)
    assert summary["cost"]["total"] == pytest.approx(sum(m["total"] for m in by_model.values()),
                                                     abs=1e-5)
    assert summary["tokens"]["prompt"] == sum(t["prompt"] for t in tokens.values())
    written = "".join(path.read_text() for path in (tmp_path / "out").rglob("*")
                      if path.is_file())
    assert "sk-strong" not in written + result.stdout + result.stderr  # the route's key


def test_a_later_stage_runs_on_the_answer_text_only_with_its_own_model_and_fails_with_its_input(
        dataset_factory, tmp_path):
    data = dataset_factory(4, files=1)
    manifest, prompts = write_job(data, tmp_path, {
        "short": {"prompt": "Shorten: {caption}", "model": "small-vlm", "image": False},
        "caption": {"prompt": "Describe the image. {note}"},
    }, notes={"r2": "REJECT_400"})
    with FakeVLMServer(FakeVLMConfig(models=("fake-vlm", "small-vlm"))) as server:
        result = run_cli([*TEST_RUNNER, "--input", str(manifest), "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--prompts_file", str(prompts)], tmp_path / "out")
        stats = server.stats()
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line["id"]: line for line in result.captions}
    assert sorted(lines) == ["r0", "r1", "r3"]
    for key, line in lines.items():
        # the text-only stage sees no image: the fake's caption of no image
        assert line["caption"] == data.expected[key]
        assert line["short"] == "A fake caption: no image"
        tokens = line["caption_meta"]["tokens_by_model"]
        assert set(tokens) == {"fake-vlm", "small-vlm"}
        assert tokens["small-vlm"]["prompt_tokens"] < tokens["fake-vlm"]["prompt_tokens"]
    (failure,) = result.failures
    assert (failure["error"]["type"], failure["error"]["prompt"]) == ("content_policy",
                                                                      "caption")
    assert "also failed: short" in failure["error"]["message"]
    assert stats["images"] == 3  # of the answered requests: the captions; "short" sent none
    assert result.summary["failed_by_type"] == {"request/content_policy": 1}


def test_a_failed_recaption_fails_the_record_with_what_both_answers_paid(dataset_factory,
                                                                        tmp_path):
    data = dataset_factory(2, files=1)
    manifest, prompts = write_job(data, tmp_path, judged_prompts(
        threshold=5, recaption={"model": "strong-vlm", "api_url": "http://127.0.0.1:9/v1"}),
        notes={"r0": "LOW_SCORE"})
    with FakeVLMServer(FakeVLMConfig(models=("fake-vlm", "judge-vlm"))) as server:
        result = run_cli([*TEST_RUNNER, "--input", str(manifest), "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--prompts_file", str(prompts), "--max_retries", "0"],
                         tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["id"] for line in result.captions] == ["r1"]
    (failure,) = result.failures
    error = failure["error"]
    assert (error["stage"], error["prompt"]) == ("request", "caption")
    assert error["paid"]["prompt_tokens"] > 0 and set(error["paid"]["by_model"]) == {
        "fake-vlm", "judge-vlm"}
    assert failure["answers"] == {"verdict": {"score": JUDGE_SCORES["low"]}}


def test_batch_mode_refuses_stages_in_one_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.png"}\n')
    base = [*TEST_RUNNER, "--input", str(tmp_path / "m.jsonl"), "--api_url",
            "http://127.0.0.1:9/v1", "--model", "m", "--skip_preflight", "--mode", "batch"]
    for prompts, message in (
            ({"caption": "c", "alt": "Shorten {caption}"}, "waits for another prompt's answer"),
            ({"caption": {"prompt": "c", "model": "other"}}, "names its own model 'other'")):
        (tmp_path / "p.json").write_text(json.dumps(prompts))
        result = run_cli([*base, "--prompts_file", str(tmp_path / "p.json")], tmp_path / "out")
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_estimate_counts_each_stage_at_its_models_price_and_the_worst_case_recaption(
        dataset_factory, tmp_path, capsys):
    from beam_caption.cli.estimate import estimate, parser
    from beam_caption.cli.main import main

    data = dataset_factory(4, files=1)
    manifest, prompts = write_job(data, tmp_path, judged_prompts(threshold=5, recaption={
        "model": "strong-vlm", "price_per_million_input_tokens": 100,
        "price_per_million_output_tokens": 100, "max_tokens": 200}))
    args = ["--input", str(manifest), "--image_root", str(data.root), "--max_tokens", "50",
            "--model", "fake-vlm", "--price_per_million_input_tokens", "2",
            "--price_per_million_output_tokens", "4"]
    plain = estimate(parser().parse_args([*args]))
    totals = estimate(parser().parse_args([*args, "--prompts_file", str(prompts)]))
    assert set(totals.by_model) == {None, "judge-vlm", "strong-vlm"}
    # the strong model: every record's caption again (its image, 200 tokens answers)
    assert totals.by_model["strong-vlm"][1] == 4 * 200
    assert totals.by_model["judge-vlm"][1] == 2 * 4 * 50  # judged, then judged again
    assert totals.recaptions == {"strong-vlm": totals.by_model["strong-vlm"]}
    assert totals.by_model[None][0] > 0 and plain.by_model == {}
    input_cost, output_cost = totals.cost(2, 4, {"judge-vlm": [1, 1],
                                                 "strong-vlm": [100, 100]})
    expected = sum(tokens[0] * price[0] + tokens[1] * price[1] for model, tokens, price in (
        (None, totals.by_model[None], (2, 4)), ("j", totals.by_model["judge-vlm"], (1, 1)),
        ("s", totals.by_model["strong-vlm"], (100, 100)))) / 1e6
    assert input_cost + output_cost == pytest.approx(expected)
    assert main(["estimate", *args, "--prompts_file", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert f"= ${expected:,.4f} at $2 / $4 per million tokens (other models at theirs)" in out
    assert "re-captions by strong-vlm: counted for every record (the worst case" in out


def test_recaption_low_scores_captions_again_the_records_a_judge_scored_low(dataset_factory,
                                                                            tmp_path):
    from test_recipes_launch import run_recipe

    data = dataset_factory(4, files=1)
    manifest, prompts = write_job(data, tmp_path, judged_prompts(), notes={"r3": "LOW_SCORE"})
    with FakeVLMServer(FakeVLMConfig(models=("fake-vlm", "judge-vlm", "strong-vlm"))) as server:
        first = run_cli([*TEST_RUNNER, "--input", str(manifest), "--api_url", server.url,
                         "--model", "fake-vlm", "--image_root", str(data.root),
                         "--prompts_file", str(prompts)], tmp_path / "first")
        assert first.returncode == 0, first.stderr[-3000:]
        scores = {line["id"]: line["caption_meta"]["quality"] for line in first.captions}
        assert {key: quality["score"] for key, quality in scores.items()} == {
            "r0": 8, "r1": 8, "r2": 8, "r3": JUDGE_SCORES["low"]}
        assert scores["r0"]["threshold"] is None and not scores["r0"]["recaptioned"]
        status, stdout, stderr = run_recipe(
            "recaption_low_scores", "--from_output", str(tmp_path / "first"), "--below", "5",
            "--output", str(tmp_path / "again"), "--api_url", server.url, "--model",
            "strong-vlm", "--image_root", str(data.root), "--prompt", "Describe it.")
    assert status == 0, stderr[-3000:]
    assert "captioning again 1 records scored below 5" in stdout
    again = run_cli_result(tmp_path / "again")
    (line,) = again
    assert line["id"] == "r3" and line["caption"] == data.expected["r3"].replace(
        "A fake caption: ", STRONG_CAPTION)
    assert (line["previous_caption"], line["previous_score"]) == (data.expected["r3"], 2)
    assert "verdict" not in line and line["note"] == "LOW_SCORE"
    status, _, stderr = run_recipe("recaption_low_scores", "--from_output",
                                   str(tmp_path / "first"), "--below", "11", "--output",
                                   str(tmp_path / "x"), "--api_url", "http://127.0.0.1:9/v1",
                                   "--model", "m")
    assert status == 2 and "--below must be a score from 1 to 10" in stderr


def run_cli_result(output) -> list[dict]:
    from conftest import read_jsonl

    return read_jsonl(str(output / "captions-*.jsonl"))


def test_max_cost_counts_every_models_answers_and_the_stop_names_each_models_spend(
        dataset_factory, tmp_path):
    import re

    # $0.01 an answer of either priced model; every caption is re-asked of the strong one.
    usage = {"prompt_tokens": 100, "completion_tokens": 0, "total_tokens": 100}
    data = dataset_factory(10, files=1)
    manifest, prompts = write_job(data, tmp_path, judged_prompts(threshold=5, recaption={
        "model": "strong-vlm", "price_per_million_input_tokens": 100,
        "price_per_million_output_tokens": 0, "api_url": "STRONG_URL"}),
        notes={f"r{i}": "LOW_SCORE" for i in range(10)})
    with FakeVLMServer(FakeVLMConfig(models=("fake-vlm", "judge-vlm"), usage=usage)) as small, \
            FakeVLMServer(FakeVLMConfig(models=("strong-vlm",), usage=usage)) as strong:
        prompts.write_text(prompts.read_text().replace("STRONG_URL", strong.url))
        # all 10 records: $0.10 by each model; $0.15 is more than either, less than both
        result = run_cli([*TEST_RUNNER, "--input", str(manifest), "--api_url", small.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--prompts_file", str(prompts), "--max_concurrency", "1",
                          "--price_per_million_input_tokens", "100",
                          "--price_per_million_output_tokens", "0", "--max_cost", "0.15"],
                         tmp_path / "out")
        strong_requests = strong.stats()["requests"]
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "--max_cost is spent (this worker process's share: $0.1500" in line, line
    spent = {model: float(dollars) for dollars, model in
             re.findall(r"\$(\d+\.\d{4}) of it by ([\w-]+)", line)}
    assert set(spent) == {"fake-vlm", "judge-vlm", "strong-vlm"}, line
    assert 0 < spent["fake-vlm"] < 0.15 and 0 < spent["strong-vlm"] < 0.15
    assert spent["fake-vlm"] + spent["strong-vlm"] >= 0.15 and "reused" not in line
    assert 0 < strong_requests < 10


def test_recaption_low_scores_skips_hostile_quality_lines_of_an_earlier_output(tmp_path):
    from test_recipes_launch import load_recipe

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    lines = [
        {"id": 1, "caption": "a", "caption_meta": {"quality": {"score": 2, "of": "caption"}}},
        {"id": 2, "caption": "b", "caption_meta": {"quality": {"score": 2, "of": ["caption"]}}},
        {"id": 3, "caption": "c", "caption_meta": ["not", "a", "dict"]},
        {"id": 4, "caption": "d", "caption_meta": {"quality": {"score": True}}},
        {"id": 5, "caption": "e", "caption_meta": {"quality": {"score": 9, "of": "caption"}}},
    ]
    (earlier / "captions-00000-of-00001.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines))
    recipe = load_recipe("recaption_low_scores")
    path, kept, left = recipe.write_low_score_manifest(str(earlier), str(tmp_path / "out"), 5)
    written = [json.loads(line) for line in open(path)]
    assert (kept, left) == (2, 3)
    assert [(r["id"], r["previous_caption"], r["previous_score"]) for r in written] == [
        (1, "a", 2), (2, None, 2)]  # a judged name that is not a string names no caption
