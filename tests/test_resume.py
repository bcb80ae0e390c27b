"""Resume: a killed run keeps its finished captions; the next run pays only for the rest."""

from __future__ import annotations

import collections
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from apache_beam.io.filesystems import FileSystems
from conftest import TEST_RUNNER, make_image, read_jsonl, run_cli

from beam_caption.cli.output_dir import prepare_output_dir, remove_temp_files
from beam_caption.core.errors import UsageError
from beam_caption.testing import FakeVLMConfig, FakeVLMServer
from beam_caption.transforms.checkpoint import CheckpointWriter


def args_for(data, server, *extra):
    return [*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
            "--model", "fake-vlm", "--image_root", str(data.root), *extra]


def checkpointed_keys(output) -> set[str]:
    return {c["caption_meta"]["key"] for c in read_jsonl(str(output / ".checkpoint" / "*.jsonl"))}


def test_output_with_earlier_results_needs_resume_or_overwrite(dataset_factory, tmp_path):
    data = dataset_factory(3, files=1)
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        assert run_cli(args_for(data, server), out).returncode == 0
        again = run_cli(args_for(data, server), out)
        assert again.returncode == 2
        assert "--resume" in again.stderr and "--overwrite" in again.stderr
        assert len(again.captions) == 3  # nothing was touched
        server.reset_stats()
        overwritten = run_cli(args_for(data, server, "--overwrite", "--num_shards", "2"), out)
        assert overwritten.returncode == 0
        assert server.stats()["requests"] == 3
    assert len(overwritten.captions) == 3
    assert len(glob.glob(str(out / "captions-*"))) == 2  # the 1-shard files of run 1 are gone


def test_killed_run_resumes_without_losing_or_repeating_records(dataset_factory, tmp_path):
    data = dataset_factory(120, files=2)
    out = tmp_path / "out"
    with FakeVLMServer(FakeVLMConfig(latency_ms=100)) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "beam_caption", *args_for(data, server),
             "--max_concurrency", "4", "--checkpoint_interval", "0.2", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(checkpointed_keys(out)) < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        done_before = checkpointed_keys(out)
        assert 30 <= len(done_before) < 120
        assert not glob.glob(str(out / "captions-*"))  # the final files were never written

        server.reset_stats()
        resumed = run_cli(args_for(data, server, "--resume", "--max_concurrency", "16"), out)
        second_run_requests = server.stats()["requests"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = [c["id"] for c in resumed.captions]
    assert len(ids) == len(set(ids)) == 120, collections.Counter(ids).most_common(2)
    assert {c["id"]: c["caption"] for c in resumed.captions} == data.expected
    assert resumed.failures == []
    assert second_run_requests == 120 - len(done_before)
    assert resumed.summary["resumed"] == len(done_before)
    assert "kept from the earlier run" in resumed.stdout
    assert not os.path.exists(out / ".checkpoint")


def test_resume_retries_earlier_failures_and_keeps_captions(dataset_factory, tmp_path):
    data = dataset_factory(6, files=1)
    # A record whose image appears only after the first run.
    with open(data.manifests[0], "a") as handle:
        handle.write('{"id": "late", "image": "images/img00100.png", '
                     '"conversation": [{"from": "human", "value": "q"}]}\n')
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        first = run_cli(args_for(data, server, "--num_shards", "3"), out)
        assert [f["record"]["id"] for f in first.failures] == ["late"]
        _, late_caption = make_image(data.root, 100)
        server.reset_stats()
        second = run_cli(args_for(data, server, "--resume"), out)
        assert second.returncode == 0, second.stderr[-3000:]
        assert server.stats()["requests"] == 1
    assert second.failures == []
    captions = {c["id"]: c["caption"] for c in second.captions}
    assert captions == {**data.expected, "late": late_caption}
    assert len(second.captions) == 7
    # Only the new run's shard set is left: no stale shards of the 3-shard first run.
    assert len(glob.glob(str(out / "captions-*"))) == 1
    summary = second.summary
    assert (summary["records"], summary["captioned"], summary["resumed"]) == (7, 7, 6)


def test_resume_reuses_a_caption_only_for_the_same_content_and_settings(dataset_factory, tmp_path):
    data = dataset_factory(10, files=2)
    jsonl = data.manifests[0]  # records r0, r2, ... r8
    out = tmp_path / "out"
    with FakeVLMServer(FakeVLMConfig(models=("fake-vlm", "fake-vlm-2"))) as server:
        def run(*extra, inputs=None):
            server.reset_stats()
            args = args_for(data, server, "--resume", *extra)
            if inputs is not None:
                args[args.index("--input") + 1] = ",".join(inputs)
            result = run_cli(args, out)
            assert result.returncode == 0, result.stderr[-3000:]
            return result, server.stats()["requests"]

        first = run_cli(args_for(data, server), out)
        assert first.returncode == 0 and len(first.captions) == 10

        # Two records inserted at the top and one edited in place: the indices of the others
        # move, but each record keeps only a caption made for its own content.
        lines = open(jsonl).read().splitlines()
        edited = json.loads(lines[1])
        edited["conversation"][0]["value"] = "Describe it again, differently."
        new = [json.dumps({"id": f"new{i}", "image": [make_image(data.root, 200 + i)[0]],
                           "conversation": [{"from": "human", "value": "q"}]}) for i in range(2)]
        open(jsonl, "w").write("\n".join([*new, lines[0], json.dumps(edited), *lines[2:]]) + "\n")
        inserted, sent = run()
        assert sent == 3  # the two new records and the edited one
        ids = [c["id"] for c in inserted.captions]
        assert sorted(ids) == sorted([*data.expected, "new0", "new1"])
        assert {c["id"]: c["caption"] for c in inserted.captions if c["id"] in data.expected} \
            == data.expected
        assert inserted.summary["resumed"] == 9 and inserted.summary["set_aside"] == 1
        set_aside = read_jsonl(str(out / "set_aside-*.jsonl"))
        assert [c["id"] for c in set_aside] == [edited["id"]]  # the stale caption, kept aside

        # Fewer --input files: the other manifest's captions are set aside, never deleted ...
        fewer, sent = run(inputs=[jsonl])
        assert sent == 0 and len(fewer.captions) == 7
        assert fewer.summary["set_aside"] == 5 + 1
        # ... and a manifest moved elsewhere is recognised by content: nothing is paid again.
        moved = tmp_path / "moved" / "manifest.json"
        moved.parent.mkdir()
        os.rename(data.manifests[1], moved)
        again, sent = run(inputs=[jsonl, str(moved)])
        assert sent == 0 and len(again.captions) == 12 and again.summary["resumed"] == 12
        keys = {c["caption_meta"]["key"] for c in again.captions}
        assert sum(key.startswith(str(moved)) for key in keys) == 5  # keys name the new place

        # Other answer settings: nothing is reused, everything earlier is set aside.
        for flag, value in [("--model", "fake-vlm-2"), ("--system_prompt", "Be brief."),
                            ("--prompt", "Name the colour."), ("--max_image_side", "32")]:
            changed, sent = run(flag, value, inputs=[jsonl, str(moved)])
            assert sent == 12 and changed.summary["resumed"] == 0, flag
            assert changed.summary["set_aside"] >= 12, flag
            assert changed.summary["options"][flag[2:]] in (value, int(value) if
                                                            value.isdigit() else value)


def test_an_output_dir_with_glob_characters_is_refused_before_anything_is_sent(tmp_path):
    for name in ("out[1]", "out*", "out?", "out{a,b}"):
        with pytest.raises(UsageError, match="glob character"):
            prepare_output_dir(str(tmp_path / name), resume=False, overwrite=False)


def test_a_failed_checkpoint_write_leaves_no_torn_file_and_keeps_its_lines(tmp_path,
                                                                           monkeypatch):
    writer = CheckpointWriter(str(tmp_path), interval_s=3600)
    writer.add({"caption": "a", "caption_meta": {"key": "k"}})
    real_create = FileSystems.create

    def full_disk(path, *args, **kwargs):
        handle = real_create(path, *args, **kwargs)
        handle.write(b"torn")
        handle.close()
        raise OSError(28, "No space left on device")

    (tmp_path / ".checkpoint").mkdir()
    monkeypatch.setattr(FileSystems, "create", full_disk)
    writer.flush()
    assert list((tmp_path / ".checkpoint").iterdir()) == []  # the torn file is gone
    monkeypatch.setattr(FileSystems, "create", real_create)
    writer.flush()  # the disk has room again: the kept line is written
    assert [c["caption"] for c in read_jsonl(str(tmp_path / ".checkpoint" / "*.jsonl"))] == ["a"]


def test_temp_files_of_a_failed_job_are_removed(tmp_path):
    temp = tmp_path / "beam-temp-captions-123"
    temp.mkdir()
    (temp / "part.captions.jsonl").write_bytes(b"x" * 1000)
    (tmp_path / ".checkpoint").mkdir()
    (tmp_path / ".checkpoint" / "part-1.jsonl").write_text("{}\n")
    remove_temp_files(str(tmp_path))
    assert not temp.exists()
    assert (tmp_path / ".checkpoint" / "part-1.jsonl").exists()  # checkpoints are for --resume
