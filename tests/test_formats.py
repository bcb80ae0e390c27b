"""Output formats: JSON lines, a JSON array per shard, Parquet; gzip; --resume from each."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TEST_RUNNER

from beam_caption.cli.launcher import run
from beam_caption.cli.report import write_report
from beam_caption.core.outputs import PARQUET_COLUMNS, parquet_schema, read_output_records
from beam_caption.testing import FakeVLMServer

FORMATS = [("jsonl", "none", ".jsonl"), ("jsonl", "gzip", ".jsonl.gz"),
           ("json", "none", ".json"), ("json", "gzip", ".json.gz"),
           ("parquet", "none", ".parquet")]


def caption_job(server, data, output: Path, *extra: str) -> dict:
    return run([*TEST_RUNNER, "--input", ",".join(data.manifests), "--output", str(output),
                "--api_url", server.url, "--model", "fake-vlm", "--image_root", str(data.root),
                "--num_shards", "2", *extra])


def load_file(path: Path):
    """A whole output file as its format's reader sees it."""
    if path.suffix == ".parquet":
        return pq.read_table(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8")
    if ".jsonl" in path.name:
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text)  # the whole shard is one JSON array


@pytest.mark.parametrize("output_format, compression, suffix", FORMATS,
                         ids=[s for _, _, s in FORMATS])
def test_each_format_holds_every_record_once_and_resume_reads_it_back(
        dataset_factory, tmp_path, output_format, compression, suffix):
    data = dataset_factory(10, bad_records=True)
    out = tmp_path / "out"
    flags = ["--output_format", output_format, "--output_compression", compression]
    with FakeVLMServer() as server:
        summary = caption_job(server, data, out, *flags)
        captions = list(read_output_records(str(out), "captions"))
        failures = list(read_output_records(str(out), "failures"))
        assert {c["id"]: c["caption"] for c in captions} == data.expected
        assert {f["record"]["id"]: f["error"]["type"] for f in failures} == data.bad
        files = sorted(out.glob("captions-*")) + sorted(out.glob("failures-*"))
        assert [f.name for f in files] == [f"{prefix}-0000{i}-of-00002{suffix}"
                                           for prefix in ("captions", "failures")
                                           for i in range(2)]
        whole = [load_file(f) for f in files]  # each file parses whole in its format
        if output_format == "parquet":
            assert all(table.schema.equals(parquet_schema()) for table in whole)
            rows = [row for table in whole[:2] for row in table.to_pylist()]
            row = next(r for r in rows if json.loads(r["line"])["id"] == "r3")
            assert row["image"] == ["images/img00003.png"]
            assert json.loads(row["answers"]) == {"caption": data.expected["r3"]}
            assert row["model"] == "fake-vlm" and row["error_type"] is None
            assert row["key"] == json.loads(row["line"])["caption_meta"]["key"]
            failed = [r for table in whole[2:] for r in table.to_pylist()]
            assert sorted(r["error_type"] for r in failed) == sorted(data.bad.values())
        else:
            assert sum(len(items) for items in whole) == summary["records"]
        # --resume finds the captions in this format and pays for none of them again
        server.reset_stats()
        again = caption_job(server, data, out, *flags, "--resume", "--skip_preflight")
        assert server.stats()["succeeded"] == 0  # only the failures were tried again
        assert again["resumed"] == len(data.expected) and again["failed"] == len(data.bad)
        assert {c["id"]: c["caption"] for c in read_output_records(str(out), "captions")} \
            == data.expected


def test_an_empty_file_set_is_still_a_valid_file_in_each_format(dataset_factory, tmp_path):
    data = dataset_factory(3)  # no failures
    with FakeVLMServer() as server:
        for output_format in ("json", "parquet"):
            out = tmp_path / output_format
            caption_job(server, data, out, "--output_format", output_format, "--num_shards", "1")
            (empty,) = out.glob("failures-*")
            if output_format == "json":
                assert json.loads(empty.read_text()) == []
            else:
                assert pq.read_table(empty).num_rows == 0
            assert len(list(read_output_records(str(out), "captions"))) == 3


def test_resume_reads_captions_written_in_another_format_and_the_report_reads_parquet(
        dataset_factory, tmp_path):
    data = dataset_factory(6)
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        caption_job(server, data, out, "--output_format", "json")
        server.reset_stats()
        summary = caption_job(server, data, out, "--output_format", "parquet", "--resume",
                              "--skip_preflight")
        assert server.stats()["succeeded"] == 0 and summary["resumed"] == 6
    assert sorted(p.suffix for p in out.glob("captions-*")) == [".parquet", ".parquet"]
    page = Path(write_report(str(out))).read_text()
    assert all(caption in page for caption in data.expected.values())


def test_the_parquet_schema_names_each_column_once():
    names = [name for name, _ in PARQUET_COLUMNS]
    assert len(names) == len(set(names)) and names[-1] == "line"
