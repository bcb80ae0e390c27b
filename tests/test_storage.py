"""The whole job on object storage: manifests, images, --output and --cache_dir on gs://
(gcp-storage-emulator, which implements the JSON-API batch requests Beam's GCS filesystem
finalizes with) and on s3:// (moto's server, AWS_ENDPOINT_URL), each with a run that has
failures, one that has none, and --resume. The emulators run on 127.0.0.1, logs in files."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import BUCKET, TEST_RUNNER, read_jsonl, run_cli

from beam_caption.testing import FakeVLMServer


def _read_remote(fs, pattern: str) -> list[dict]:
    lines = []
    for path in sorted(fs.glob(pattern)):
        lines.extend(json.loads(line) for line in fs.cat(path).decode().splitlines() if line)
    return lines


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_a_job_wholly_on_object_storage(store, request, dataset_factory, tmp_path):
    scheme, env, fs = request.getfixturevalue(store)
    data = dataset_factory(12, files=2, bad_records=True)
    fs.put(str(data.root) + "/", f"{BUCKET}/run/", recursive=True)
    root = f"{scheme}://{BUCKET}/run"
    output, cache = f"{root}/out", f"{root}/cache"
    with FakeVLMServer() as server:
        def job(*flags):
            return run_cli([*TEST_RUNNER, "--input", f"{root}/manifest*", "--image_root", root,
                            "--cache_dir", cache, "--api_url", server.url, "--model", "fake-vlm",
                            *flags], output, env=env)  # type: ignore[arg-type]

        first = job()
        assert first.returncode == 0, first.stderr[-3000:]
        captions = _read_remote(fs, f"{BUCKET}/run/out/captions-*.jsonl")
        failures = _read_remote(fs, f"{BUCKET}/run/out/failures-*.jsonl")
        assert {r["id"]: r["caption"] for r in captions} == data.expected
        assert all(r["caption_meta"]["key"].startswith(f"{root}/manifest") for r in captions)
        assert {f["record"]["id"]: f["error"]["type"] for f in failures} == data.bad
        summary = json.loads(fs.cat(f"{BUCKET}/run/out/summary.json"))
        assert summary["captioned"] == 12 and summary["failed"] == 2
        assert not fs.glob(f"{BUCKET}/run/out/.checkpoint/*")
        sent = server.stats()["requests"]

        resumed = job("--resume")  # every caption kept; the two failures tried again
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        resumed_summary = json.loads(fs.cat(f"{BUCKET}/run/out/summary.json"))
        assert resumed_summary["resumed"] == 12 and resumed_summary["failed"] == 2
        assert server.stats()["requests"] - sent <= 1  # only the rejected record is re-sent

        clean = f"{root}/clean"
        fs.pipe(f"{BUCKET}/run/clean.jsonl", "".join(
            json.dumps(r) + "\n" for r in read_jsonl(data.manifests[0])
            if r["id"] not in data.bad).encode())
        none_failed = run_cli([*TEST_RUNNER, "--input", f"{root}/clean.jsonl", "--image_root",
                               root, "--cache_dir", cache, "--api_url", server.url, "--model",
                               "fake-vlm"], clean, env=env)  # type: ignore[arg-type]
        assert none_failed.returncode == 0, none_failed.stderr[-3000:]
        assert server.stats()["requests"] - sent <= 1  # the cache answered every request
    assert _read_remote(fs, f"{BUCKET}/run/clean/failures-*.jsonl") == []
    assert fs.glob(f"{BUCKET}/run/clean/failures-*.jsonl")  # an empty file set still finalizes
    assert len(_read_remote(fs, f"{BUCKET}/run/clean/captions-*.jsonl")) == 6
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("gs:", "s3:"))]


def _validate(**flags):
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_caption.cli.flags import CaptionOptions, validate_options

    values = {"input": "m.jsonl", "output": "gs://bucket/out", "api_url": "http://h/v1",
              "model": "m", **flags}
    validate_options(PipelineOptions([f"--{name}={value}" for name, value in values.items()])
                     .view_as(CaptionOptions))


@pytest.mark.parametrize("flags, message", [
    ({"output": "https://host/out"},
     "--output https://host/out: https:// is not supported here; use a local path or gs://, "
     "s3://"),
    ({"cache_dir": "ftp://host/cache"}, "--cache_dir ftp://host/cache: ftp:// is not supported"),
    ({"input": "m.jsonl,hdfs://nn/m.jsonl"}, "--input hdfs://nn/m.jsonl: hdfs:// is not"),
    ({"image_root": "ftp://user:pw@host/images?sig=s3cret"},
     "--image_root ftp://REDACTED@host/images?REDACTED: ftp:// is not supported here; use a "
     "local path or gs://, gcs://, s3://, http://, https://"),
])
def test_a_location_no_job_can_use_is_refused_at_launch(flags, message):
    from beam_caption.core.errors import UsageError

    with pytest.raises(UsageError) as info:
        _validate(**flags)
    assert str(info.value).startswith(message)


def test_s3_without_the_s3_extra_is_refused_at_launch(monkeypatch):
    from beam_caption.core.errors import UsageError

    _validate(input="s3://bucket/m.jsonl", output="s3://bucket/out")  # installed: accepted
    monkeypatch.setitem(sys.modules, "boto3", None)  # Beam's S3 filesystem writes with it
    _validate(input="s3://bucket/m.jsonl")  # reads need s3fs only
    with pytest.raises(UsageError, match=r"--output s3://bucket/out needs the s3 extra"):
        _validate(output="s3://bucket/out")
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(UsageError, match=r"--input s3://bucket/m.jsonl needs the s3 extra"):
        _validate(input="s3://bucket/m.jsonl")
