"""Earlier outputs as outside input: --resume over damaged or foreign files, and report.html
from a foreign or hand-edited output (issue 22)."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_RUNNER, make_dataset

from beam_caption.cli.main import main
from beam_caption.cli.output_dir import existing_outputs, prepare_output_dir
from beam_caption.cli.report import MAX_FAILURE_KINDS, MAX_FAILURE_ROWS, write_report
from beam_caption.core.errors import UsageError
from beam_caption.core.outputs import DAMAGED_DIR, parquet_row, parquet_schema
from beam_caption.testing import FakeVLMServer
from beam_caption.transforms.checkpoint import CHECKPOINT_DIR, clear_checkpoints
from beam_caption.transforms.skip_done import earlier_caption, earlier_captions

FINAL = "final-20250101T000000-captions-00000-of-00001"
# Files a user keeps next to the outputs: names that look like shards but are not the project's.
FOREIGN = {"captions-00000-of-00002.jsonl.bak": b'{"kept": "a backup"}\n',
           "captions-review-of-alice.csv": b"key,verdict\nr1,good\n",
           "captions-notes-of-bob.txt": b"notes \xff not even UTF-8\n"}

SKIP_DONE_LOGGER = "beam_caption.transforms.skip_done"  # logs what --resume could not read


def caption(i: int, **meta) -> dict:
    """A caption line as the project writes it, ``meta`` changing its caption_meta."""
    return {"id": f"r{i}", "caption": f"caption {i}", "caption_meta": {
        "model": "m", "attempts": 1, "prompt_tokens": 50, "completion_tokens": 9,
        "key": f"m.jsonl#{i}", "fingerprint": f"{i:064x}", "finished_at": 1.7e9, **meta}}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def parquet_bytes(path: Path, lines: list[dict]) -> bytes:
    rows = [parquet_row(line, "image", ["caption"]) for line in lines]
    pq.write_table(pa.Table.from_pylist(rows, schema=parquet_schema()), path)
    return path.read_bytes()


def damaged_file(folder: Path, kind: str) -> tuple[Path, set[str]]:
    """An earlier final shard damaged as ``kind`` and the keys still readable from it."""
    lines = [caption(i) for i in range(4)]
    if kind == "gzip with garbage in the middle":
        path = folder / f"{FINAL}.jsonl.gz"
        path.write_bytes(gzip.compress(jsonl(lines[:2])) + b"\x00garbage" * 50
                         + gzip.compress(jsonl(lines[2:])))
        return path, {"m.jsonl#0", "m.jsonl#1"}
    if kind == "truncated parquet":
        path = folder / f"{FINAL}.parquet"
        whole = parquet_bytes(path, lines)
        path.write_bytes(whole[: len(whole) // 2])
        return path, set()
    if kind == "parquet without the line column":
        path = folder / f"{FINAL}.parquet"
        pq.write_table(pa.table({"key": [line["caption_meta"]["key"] for line in lines]}), path)
        return path, set()
    assert kind == "a key that is a list"
    path = folder / f"{FINAL}.jsonl.gz"
    lines[0]["caption_meta"]["key"] = ["m.jsonl#0"]
    path.write_bytes(gzip.compress(jsonl(lines)))
    return path, {"m.jsonl#1", "m.jsonl#2", "m.jsonl#3"}


@pytest.mark.parametrize("kind", ["gzip with garbage in the middle", "truncated parquet",
                                  "parquet without the line column", "a key that is a list"])
def test_a_damaged_earlier_file_is_read_up_to_the_damage_named_once_and_kept(tmp_path, caplog,
                                                                              kind):
    folder = tmp_path / CHECKPOINT_DIR
    folder.mkdir()
    path, readable = damaged_file(folder, kind)
    original = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger=SKIP_DONE_LOGGER):
        found = list(earlier_captions(str(path), str(tmp_path)))
    assert {caption["caption_meta"]["key"] for _, caption in found} == readable
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    kept = tmp_path / DAMAGED_DIR / path.name
    assert len(warnings) == 1 and str(path) in warnings[0] and str(kept) in warnings[0]
    assert kept.read_bytes() == original  # a byte-identical copy, outside .checkpoint/
    clear_checkpoints(str(tmp_path))  # what a good run does next
    assert kept.read_bytes() == original


def test_an_intact_earlier_file_is_read_whole_and_left_where_it_is(tmp_path, caplog):
    lines = [caption(i) for i in range(3)]
    path = tmp_path / f"{FINAL}.parquet"
    parquet_bytes(path, lines)
    with caplog.at_level(logging.WARNING):
        found = list(earlier_captions(str(path), str(tmp_path)))
    assert found == [(line["caption_meta"]["fingerprint"], line) for line in lines]
    assert not caplog.records and not (tmp_path / DAMAGED_DIR).exists()


@pytest.mark.parametrize(("line", "problem"), [
    (caption(1, key=["m.jsonl#1"]), "caption_meta.key is a list"),
    (caption(1, key=None), "caption_meta.key is null"),
    (caption(1, fingerprint=["f"]), "caption_meta.fingerprint is a list"),
    (caption(1, fingerprint=7), "caption_meta.fingerprint is 7"),
    (caption(1, attempts="2"), "caption_meta.attempts is a string"),
    (caption(1, attempts=None), "caption_meta.attempts is null"),
    (caption(1, prompt_tokens=-3), "caption_meta.prompt_tokens is -3"),
    (caption(1, completion_tokens=1e300), "caption_meta.completion_tokens is 1e+300"),
    (caption(1, reasoning_tokens=True), "caption_meta.reasoning_tokens is true"),
    (caption(1, prompts=[]), "caption_meta.prompts is not an object"),
    (caption(1, prompts={"a": {"attempts": "1"}}), "caption_meta.prompts.a.attempts"),
    ({**caption(1), "caption_meta": "m.jsonl#1"}, "caption_meta is a string"),
    ([caption(1)], "a list, not an object"),
    ({**caption(1), "caption": "\ud800"}, "lone surrogate"),
])
def test_earlier_caption_refuses_wrong_types_in_the_fields_resume_reads(line, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        earlier_caption(json.dumps(line))


def test_earlier_caption_takes_captions_with_or_without_a_fingerprint():
    line = caption(1, prompts={"a": {"attempts": 1}, "b": {"attempts": 2}})
    assert earlier_caption(json.dumps(line)) == (f"{1:064x}", line)
    old = caption(2)
    del old["caption_meta"]["fingerprint"]  # made before fingerprints: set aside, not reused
    assert earlier_caption(json.dumps(old)) == (None, old)
    for text in (None, '{"caption_meta": NaN}', "[" * 5000, "{torn"):
        with pytest.raises(ValueError):
            earlier_caption(text)


def test_only_the_projects_own_shards_are_counted_moved_or_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, content in FOREIGN.items():
        (out / name).write_bytes(content)
    assert existing_outputs(str(out)) == []  # no refusal: nothing of the project's is there
    assert prepare_output_dir(str(out), resume=False, overwrite=True) is False
    shard = out / "captions-00000-of-00001.jsonl"
    shard.write_bytes(jsonl([caption(0)]))
    (out / "failures-00000-of-00001.jsonl").write_bytes(b"")
    assert prepare_output_dir(str(out), resume=True, overwrite=False) is True
    assert not shard.exists() and not (out / "failures-00000-of-00001.jsonl").exists()
    assert {p.name for p in out.iterdir()} == {*FOREIGN, CHECKPOINT_DIR}
    assert all((out / name).read_bytes() == content for name, content in FOREIGN.items())
    stray = out / CHECKPOINT_DIR / "notes.txt"  # not a name the project writes there
    stray.write_text("mine")
    clear_checkpoints(str(out))
    assert [p.name for p in (out / CHECKPOINT_DIR).iterdir()] == ["notes.txt"]


def test_resume_over_damaged_shards_left_aside_by_a_failed_try_recaptions_only_what_was_lost(
        tmp_path, caplog):
    data = make_dataset(tmp_path / "data", 8, files=1)
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        args = [*TEST_RUNNER, "--input", data.manifests[0], "--api_url", server.url,
                "--model", "fake-vlm", "--image_root", str(data.root), "--output", str(out),
                "--output_compression", "gzip", "--num_shards", "1", "--no_progress"]
        assert main(args) == 0
        # Its 8 captions as two shards: garbage after the first line of one, a key that is a
        # list in the first line of the other.
        (shard,) = out.glob("captions-*.jsonl.gz")
        lines = gzip.decompress(shard.read_bytes()).splitlines(keepends=True)
        shard.unlink()
        shards = [out / f"captions-0000{i}-of-00002.jsonl.gz" for i in range(2)]
        shards[0].write_bytes(gzip.compress(b"".join(lines[:1])) + b"garbage" * 20
                              + gzip.compress(b"".join(lines[1:4])))
        broken = json.loads(lines[4])
        broken["caption_meta"]["key"] = [broken["caption_meta"]["key"]]
        shards[1].write_bytes(gzip.compress(json.dumps(broken).encode() + b"\n"
                                            + b"".join(lines[5:])))
        lost = 3 + 1
        for name, content in FOREIGN.items():
            (out / name).write_bytes(content)
        # An earlier try moved the shards aside and then failed: the next one must still work.
        prepare_output_dir(str(out), resume=True, overwrite=False)
        server.reset_stats()
        with caplog.at_level(logging.WARNING, logger=SKIP_DONE_LOGGER):
            assert main([*args, "--resume"]) == 0
        assert server.stats()["requests"] == lost  # the records of what could not be read
        warnings = [r.getMessage() for r in caplog.records if r.name == SKIP_DONE_LOGGER]
        assert len(warnings) == 2 and all("is damaged" in w for w in warnings)
        caplog.clear()
        assert main([*args, "--resume"]) == 0  # and every later try
        assert server.stats()["requests"] == lost
        assert not [r for r in caplog.records if r.name == SKIP_DONE_LOGGER]
    captions = [json.loads(line) for shard in out.glob("captions-*.jsonl.gz")
                for line in gzip.decompress(shard.read_bytes()).splitlines()]
    assert sorted(c["id"] for c in captions) == sorted(data.expected)
    assert all(c["caption"] == data.expected[c["id"]] for c in captions)
    assert all((out / name).read_bytes() == content for name, content in FOREIGN.items())
    kept = sorted(p.name for p in (out / DAMAGED_DIR).iterdir())
    assert [name.split("-", 2)[2] for name in kept] == [shard.name for shard in shards]
    assert not (out / CHECKPOINT_DIR).exists()


def test_report_of_a_hostile_output_succeeds_and_the_page_stays_small(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({
        "records": 10**200, "captioned": "x" * 100_000, "options": {"model": "m" * 100_000},
        "output_keys": "caption"}))
    odd = [1e308, -1e308, float("nan"), float("inf"), -5, "soon", [1], True]
    captions = [caption(i, finished_at=value, latency_ms=value, prompt_tokens=value)
                for i, value in enumerate(odd)]
    captions += [{**caption(9, key="k" * 1_000_000), "caption": "c" * 1_000_000,
                  "image": ["i" * 100_000] * 100}, {"caption_meta": "not an object"}]
    text = "".join(json.dumps(line) + "\n" for line in captions) + "[1, 2]\n{torn\n"
    (out / "captions-00000-of-00001.jsonl").write_text(text)
    failures = [{"key": f"m.jsonl#{i}", "error": {
        "stage": "request", "type": f"batch_code_{i}_" + "x" * 1000, "message": "m" * 10_000}}
        for i in range(20_000)] + [{"error": "not an object"}]
    (out / "failures-00000-of-00002.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in failures))
    (out / "failures-00001-of-00002.jsonl.gz").write_bytes(
        gzip.compress(jsonl(failures[:2]))[:30])  # cut short
    (out / "captions-notes-of-bob.txt").write_bytes(FOREIGN["captions-notes-of-bob.txt"])
    page = Path(write_report(str(out), sample=24)).read_text(encoding="utf-8")
    assert len(page.encode()) < 200_000  # 6 MB before: every failure kind had its row
    assert page.count("<tr><td>request</td>") == MAX_FAILURE_ROWS
    assert f"others (more than {MAX_FAILURE_KINDS - MAX_FAILURE_ROWS:,} kinds)" in page
    assert "values not shown" in page and "failures-00001-of-00002.jsonl.gz" in page
    assert "2 lines that are not JSON objects were skipped" in page
    assert page.count("<figure>") == len(captions)


def test_report_refuses_a_summary_that_is_not_an_object(tmp_path):
    (tmp_path / "summary.json").write_text("[]")
    with pytest.raises(UsageError, match="not an object"):
        write_report(str(tmp_path))
