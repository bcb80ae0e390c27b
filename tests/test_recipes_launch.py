"""The recipes of pipelines/ share the CLI's launch (beam_caption/cli/recipe.py): the flags of
the system they replace, unknown flags refused, preflight, the output directory's rules, the
summary line, clean exit statuses, --help; each run in this process through ``run_recipe``."""

from __future__ import annotations

import datetime
import glob
import importlib.util
import json
from pathlib import Path
from unittest import mock

import pytest
from conftest import TEST_RUNNER, make_image, run_main

from beam_caption.testing import FakeVLMServer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "image_caption" / "sample_data.json"
RECIPES = ("image_caption", "several_prompts", "tagging", "recaption_failures", "caption_rows",
           "recaption_img2dataset", "recaption_low_scores")


def load_recipe(name: str):
    """The module of ``pipelines/NAME.py`` (pipelines/ is no package: loaded by path)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}",
                                                  REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe(name: str, *argv: str) -> tuple[int, str, str]:
    """``python pipelines/NAME.py ARGV`` as the recipe's ``main`` in this process (conftest's
    run_main: output captured, environment and logging restored): (status, stdout, stderr)."""
    with mock.patch("beam_caption.cli.main.main", load_recipe(name).main):
        return run_main([*argv, *TEST_RUNNER])


def lines_of(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))


@pytest.fixture(scope="module")
def server():
    with FakeVLMServer() as fake:
        yield fake


def sample_args(server, output: Path, *more: str) -> list[str]:
    return ["--images_file", str(SAMPLE), "--cache_path", str(output), "--api_url", server.url,
            "--model", "fake-vlm", *more]


def test_prefix_and_format_of_the_replaced_system_are_honoured(server, tmp_path):
    out = tmp_path / "cache_local"
    status, stdout, stderr = run_recipe("image_caption", *sample_args(
        server, out, "--file_name_prefix", "caption", "--cache_type", "json"))
    assert status == 0, stderr[-3000:]
    assert [Path(p).name for p in lines_of(f"{out}/caption*")] == ["caption-00000-of-00001.json"]
    captions = json.loads((out / "caption-00000-of-00001.json").read_text())  # a JSON array
    assert len(captions) == len(json.loads(SAMPLE.read_text()))
    assert all(c["caption"].startswith("A fake caption:") for c in captions)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["file_name_prefix"] == "caption"
    assert summary["options"]["output_format"] == "json"
    # the summary line, as the CLI prints it, naming the files written; nothing left behind
    assert f"captioned {len(captions)} of {len(captions)} records (0 failed)" in stdout
    assert f"outputs: {out}/caption-*.json, {out}/failures-*.json" in stdout
    assert not (out / ".checkpoint").exists() and not lines_of(f"{out}/beam-temp-*")


def test_a_used_output_dir_is_refused_then_resumed_or_overwritten(server, tmp_path):
    out = tmp_path / "out"
    args = sample_args(server, out, "--file_name_prefix", "caption")
    assert run_recipe("image_caption", *args)[0] == 0
    before = server.stats()["requests"]
    status, stdout, stderr = run_recipe("image_caption", *args)
    assert status == 2 and "already holds outputs of an earlier run" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not stdout
    status, stdout, _ = run_recipe("image_caption", *args, "--resume")
    assert status == 0 and "captions were kept from the earlier run" in stdout
    assert server.stats()["requests"] == before  # the prefixed captions were found and reused
    assert [Path(p).name for p in lines_of(f"{out}/caption*")] == [
        "caption-00000-of-00001.jsonl"]
    assert run_recipe("image_caption", *args, "--overwrite")[0] == 0
    assert server.stats()["requests"] > before
    assert not (out / ".checkpoint").exists()


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "unknown flag --bogus"),
    (["--cache_type", "xml"], "argument --cache_type: invalid choice"),
    (["--file_name_prefix", "a/b"], "--file_name_prefix 'a/b'"),
    (["--cache_type", "json", "--output_format", "parquet"], "--cache_type and --output_format"),
    (["--mode", "batch"], "runs online jobs"),
])
def test_bad_flags_are_one_line_and_exit_2(server, tmp_path, argv, message):
    status, stdout, stderr = run_recipe("image_caption",
                                        *sample_args(server, tmp_path / "out"), *argv)
    assert status == 2 and message in stderr and stderr.startswith("image_caption.py: error:")
    assert len(stderr.strip().splitlines()) == 1 and not stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preflight", [[], ["--skip_preflight"]])
def test_a_bad_model_is_one_line_exit_2_and_leaves_no_temp_files(server, tmp_path, preflight):
    out = tmp_path / "out"
    status, stdout, stderr = run_recipe("image_caption", "--images_file", str(SAMPLE),
                                        "--cache_path", str(out), "--api_url", server.url,
                                        "--model", "nope", "--no_progress", *preflight)
    assert status == 2, stderr[-3000:]
    assert "nope" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and not stdout
    assert stderr.count("stopped the job") <= 1
    assert not lines_of(f"{out}/beam-temp-*") and not (out / "summary.json").exists()


@pytest.mark.parametrize("name, own_flags", [
    ("image_caption", ["--images_file", "--cache_path", "--file_name_prefix", "--cache_type"]),
    ("several_prompts", []),
    ("tagging", []),
    ("recaption_failures", ["--from_output", "--all"]),
    ("recaption_low_scores", ["--from_output", "--below"]),
    ("caption_rows", ["--image_column"]),
    ("recaption_img2dataset", ["--img2dataset_folder", "--no_copy_images", "--alt_text_hint"]),
])
def test_help_lists_the_recipes_flags_and_the_clis(name, own_flags):
    status, stdout, _ = run_recipe(name, "--help")
    assert status == 0
    for flag in [*own_flags, "--input", "--output", "--api_url", "--model", "--resume",
                 "--overwrite", "--max_concurrency"]:
        assert flag in stdout, flag


def test_every_recipe_is_covered():
    assert sorted(RECIPES) == sorted(p.stem for p in (REPO / "pipelines").glob("*.py"))


def test_caption_rows_captions_a_parquet_tables_rows_without_a_manifest(server, tmp_path):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    images = [make_image(tmp_path, i) for i in range(5)]  # (relative path, its fake caption)
    rows = [{"row_id": i, "path": path, "shot": datetime.date(2024, 5, i + 1)}
            for i, (path, _) in enumerate(images)] + [{"row_id": 99, "path": None, "shot": None}]
    pyarrow_parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "photos.parquet")
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "photos.parquet"), "--image_column", "path",
            "--key_column", "row_id", "--output", str(out), "--api_url", server.url,
            "--model", "fake-vlm", "--image_root", str(tmp_path), "--prompt", "Describe it."]
    status, stdout, stderr = run_recipe("caption_rows", *argv)
    assert status == 0, stderr[-3000:]
    captions = [json.loads(line) for path in lines_of(f"{out}/captions-*") for line in open(path)]
    failures = [json.loads(line) for path in lines_of(f"{out}/failures-*") for line in open(path)]
    assert {c["row_id"]: c["caption"] for c in captions} == {
        i: caption for i, (_, caption) in enumerate(images)}
    assert {c["caption_meta"]["key"] for c in captions} == {str(i) for i in range(5)}
    assert captions[0]["image"] and "path" not in captions[0]
    assert captions[0]["shot"].startswith("2024-05-")  # a date column, as text
    assert [f["key"] for f in failures] == ["99"]  # the row without an image: one failure
    assert "captioned 5 of 6 records (1 failed)" in stdout
    assert json.loads((out / "summary.json").read_text())["records"] == len(rows)
    before = server.stats()["requests"]
    status, stdout, stderr = run_recipe("caption_rows", *argv, "--resume")
    assert status == 0, stderr[-3000:]
    assert server.stats()["requests"] == before  # every row's caption was reused
    assert "5 captions were kept from the earlier run" in stdout
    assert "captioned 5 of 6 records (1 failed)" in stdout
    assert run_recipe("caption_rows", *argv, "--overwrite")[0] == 0
    assert server.stats()["requests"] == before + 5


def test_recaption_img2dataset_writes_captioned_shards_with_their_images(server, tmp_path):
    from test_datasets import write_shard

    from beam_caption.core.inputs import SAMPLE_PROMPT
    from beam_caption.core.webdataset import iter_samples

    folder = tmp_path / "laion_part"  # img2dataset's layout: shards beside .parquet and stats
    folder.mkdir()
    expected = {**write_shard(folder / "00000.tar", {f"{i:09d}": i for i in range(3)}),
                **write_shard(folder / "00001.tar", {f"{i:09d}": i for i in range(10000, 10002)})}
    (folder / "00000.parquet").write_bytes(b"PAR1 not read")
    (folder / "00000_stats.json").write_text("{}")
    out = tmp_path / "recaptioned"
    status, stdout, stderr = run_recipe(
        "recaption_img2dataset", "--img2dataset_folder", str(folder), "--output", str(out),
        "--api_url", server.url, "--model", "fake-vlm", "--alt_text_hint", "--num_shards", "1")
    assert status == 0, stderr[-3000:]
    assert "captioned 5 of 5 records" in stdout
    [shard] = lines_of(f"{out}/captions-*.tar")
    samples = {element["record"]["__key__"]: element for element in iter_samples(shard)}
    assert sorted(samples) == sorted(expected)
    for key, element in samples.items():
        record = element["record"]["json"]
        assert record["caption"] == element["record"]["txt"] == expected[key]
        assert record["json"] == {"key": key, "width": 8}  # the sample's own .json, kept
        hint = record["conversation"][0]["value"]
        assert hint.startswith(SAMPLE_PROMPT)  # the CLI's prompt for shards
        assert f"alt text of {key}" in hint
        source = folder / f"{record['__url__'].rsplit('/', 1)[-1]}"
        [original] = [e for e in iter_samples(str(source)) if e["record"]["__key__"] == key]
        assert element["images"] == original["images"]  # the image copied byte for byte
    assert lines_of(f"{out}/failures-*.jsonl")


def test_recaption_img2dataset_needs_its_folder(server, tmp_path):
    status, stdout, stderr = run_recipe("recaption_img2dataset", "--output", str(tmp_path / "o"),
                                        "--api_url", server.url, "--model", "fake-vlm")
    assert status == 2 and "--img2dataset_folder" in stderr and not stdout
