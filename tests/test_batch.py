"""--mode batch: requests through the Batch API (/v1/files + /v1/batches of the fake server)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

from conftest import TEST_RUNNER, run_cli
from test_end_to_end import check_every_record_once

from beam_caption.core.batch_api import BatchAPI
from beam_caption.core.ledger import LedgerEntry, read_entries, write_entry
from beam_caption.testing import FakeVLMConfig, FakeVLMServer

BATCH = ["--mode", "batch", "--batch_poll_interval", "0.2"]


def job_flags(server, data) -> list[str]:
    return [*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
            "--model", "fake-vlm", "--image_root", str(data.root)]


def test_a_batch_run_over_several_files_writes_what_the_online_run_writes(
        dataset_factory, tmp_path):
    data = dataset_factory(30, bad_records=True)
    with FakeVLMServer() as server:
        result = run_cli([*job_flags(server, data), *BATCH, "--batch_max_requests", "8",
                          "--price_per_million_input_tokens", "2",
                          "--price_per_million_output_tokens", "8"], tmp_path / "batch")
        events = server.stats()["events"]
        chats = server.stats()["requests"]
        online = run_cli(job_flags(server, data), tmp_path / "online")
    assert result.returncode == 0, result.stderr[-3000:]
    captions, failures = check_every_record_once(result, data)
    check_every_record_once(online, data)
    assert {c["id"]: c["caption"] for c in result.captions} == \
        {c["id"]: c["caption"] for c in online.captions}
    # 31 requests (30 + the rejected one) in files of at most 8; the missing image never sent
    entries = read_entries(str(tmp_path / "batch"))
    assert sum(len(e.custom_ids) for e in entries) == 31
    assert all(len(e.custom_ids) <= 8 for e in entries)
    assert events["upload"] == events["batch"] == len(entries) >= math.ceil(31 / 8)
    assert chats == 0  # every caption came through a batch (the preflight lists models)
    assert failures["rejected"]["error"]["attempts"] == 1
    meta = captions["r3"]["caption_meta"]
    assert meta["batch_id"] in {e.batch_id for e in entries} and meta["attempts"] == 1
    summary = result.summary
    full = (summary["tokens"]["prompt"] * 2 + summary["tokens"]["completion"] * 8) / 1e6
    assert summary["cost"]["total"] == round(full / 2, 6)  # the batch price: half
    assert "batch: " in result.stderr and "batches ended" in result.stderr


def test_killing_the_launcher_after_submission_and_resuming_submits_nothing_twice(
        dataset_factory, tmp_path):
    data = dataset_factory(12)
    out = tmp_path / "out"
    with FakeVLMServer(FakeVLMConfig(batch_delay_s=4)) as server:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "beam_caption", *job_flags(server, data), *BATCH,
             "--batch_max_requests", "5", "--output", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and launcher.poll() is None:
            entries = read_entries(str(out)) if (out / "batches").exists() else []
            if sum(len(e.custom_ids) for e in entries) == 12 and \
                    all(e.batch_id for e in entries):
                break  # everything is submitted: the launcher now waits on the batches
            time.sleep(0.1)
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        submitted = server.stats()["events"]
        assert submitted["batch"] == submitted["upload"] == len(read_entries(str(out))) >= 3
        assert not list(out.glob("captions-*"))  # killed before anything was collected
        # The manifest is edited meanwhile: every record after the first moves up one place.
        manifest = data.manifests[0]
        first, *rest = open(manifest).read().splitlines()
        open(manifest, "w").write("\n".join(rest) + "\n")
        del data.expected[json.loads(first)["id"]]
        resumed = run_cli([*job_flags(server, data), *BATCH, "--resume"], out)
        assert server.stats()["events"] == submitted  # no upload, no batch twice
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_every_record_once(resumed, data)  # each record got the answer for its own image


def test_a_result_file_that_cannot_be_downloaded_fails_its_records_not_the_job(
        dataset_factory, tmp_path):
    data = dataset_factory(5, files=1)
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        assert run_cli([*job_flags(server, data), *BATCH], out).returncode == 0
        (entry,) = read_entries(str(out))
        entry.output_file_id = "file-gone"  # past the provider's retention
        write_entry(str(out), entry)
        for collected_file in [*out.glob("captions-*"), *out.glob("failures-*")]:
            collected_file.unlink()  # as if they had never been collected
        collected = run_cli(["collect", *job_flags(server, data)], out)
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert not collected.captions and len(collected.failures) == 5
    error = collected.failures[0]["error"]
    assert (error["type"], error["retryable"]) == ("batch_download_failed", True)
    assert "file-gone" in error["message"]


def test_a_batch_found_again_after_a_death_between_upload_and_ledger(dataset_factory,
                                                                     tmp_path):
    """An upload recorded without its batch: the batch made of it is found, or made once."""
    data = dataset_factory(4, files=1)
    with FakeVLMServer() as server:
        first = run_cli([*job_flags(server, data), *BATCH], tmp_path / "first")
        assert first.returncode == 0, first.stderr[-3000:]
        (entry,) = read_entries(str(tmp_path / "first"))
        for created in (True, False):
            out = tmp_path / f"created-{created}"
            api = BatchAPI(server.url, None)
            file_id = api.upload(api.download(entry.file_id), "again.jsonl")  # same lines
            if created:
                api.create(file_id, {})  # the batch was made, the ledger not told
            write_entry(str(out), LedgerEntry(entry.name, file_id, entry.custom_ids,
                                              entry.fingerprints, time.time()))
            before = server.stats()["events"]["batch"]
            collected = run_cli([*job_flags(server, data), *BATCH, "--resume"], out)
            assert collected.returncode == 0, collected.stderr[-3000:]
            assert server.stats()["events"]["batch"] == before + (0 if created else 1)
            check_every_record_once(collected, data)


def test_failed_lines_become_typed_failures_and_retry_failed_or_resume_submit_them_again(
        dataset_factory, tmp_path):
    data = dataset_factory(6, files=1)
    manifest = data.manifests[0]
    lines = open(manifest).read().splitlines()
    broken = json.loads(lines[0])
    broken["conversation"][0]["value"] = "BATCH_FAIL please"
    open(manifest, "w").write("\n".join([json.dumps(broken), *lines[1:]]) + "\n")
    del data.expected[broken["id"]]
    data.bad[broken["id"]] = "http_500"
    with FakeVLMServer() as server:
        result = run_cli([*job_flags(server, data), *BATCH], tmp_path / "out")
        assert server.stats()["events"]["batch"] == 1
        retried = run_cli([*job_flags(server, data), *BATCH, "--retry_failed"], tmp_path / "again")
        assert server.stats()["events"]["batch"] == 1 + 2  # the job's batch, then the retry's
        resumed = run_cli([*job_flags(server, data), *BATCH, "--resume"], tmp_path / "out")
        assert server.stats()["events"]["batch"] == 3 + 1  # only the failed record, again
    assert resumed.summary["resumed"] == len(data.expected)
    for run in (result, retried, resumed):
        assert run.returncode == 0, run.stderr[-3000:]
        _, failures = check_every_record_once(run, data)
        error = failures[broken["id"]]["error"]
        assert (error["stage"], error["retryable"], error["attempts"]) == ("request", True, 1)
        assert "server had an error" in error["message"]
    assert "submitting again the 1 records" in retried.stderr


def test_an_expired_batch_is_recorded_or_falls_back_to_the_online_path(dataset_factory,
                                                                        tmp_path):
    data = dataset_factory(10, files=1)
    with FakeVLMServer(FakeVLMConfig(batch_expire=True)) as server:
        expired = run_cli([*job_flags(server, data), *BATCH], tmp_path / "expired")
        server.reset_stats()
        fallback = run_cli([*job_flags(server, data), *BATCH, "--fallback", "online"],
                           tmp_path / "fallback")
        chats = server.stats()["requests"]
    assert expired.returncode == 0, expired.stderr[-3000:]
    failures = [f for f in expired.failures]
    assert len(failures) == 5 and len(expired.captions) == 5  # half answered before expiry
    assert {f["error"]["type"] for f in failures} == {"batch_expired"}
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    check_every_record_once(fallback, data)
    online = [c for c in fallback.captions if "batch_id" not in c["caption_meta"]]
    assert len(online) == 5 and chats == 5  # the five the expired batch left


def test_max_cost_stops_submitting_and_resume_continues(dataset_factory, tmp_path):
    data = dataset_factory(12, files=1)
    prices = ["--price_per_million_input_tokens", "2", "--price_per_million_output_tokens", "8",
              "--max_tokens", "100", "--batch_max_requests", "4"]
    with FakeVLMServer() as server:
        # a file of 4 requests costs at most ~4 * (300 + 100 * 4) / 1e6 = $0.0028 at batch price
        stopped = run_cli([*job_flags(server, data), *BATCH, *prices, "--max_cost", "0.004"],
                          tmp_path / "out")
        assert stopped.returncode == 2, stopped.stderr[-3000:]
        assert stopped.stderr.count("\n") == 1 and "--max_cost would be spent" in stopped.stderr
        submitted = sum(len(e.custom_ids) for e in read_entries(str(tmp_path / "out")))
        assert 0 < submitted < 12 and server.stats()["events"]["batch"] == submitted // 4
        resumed = run_cli([*job_flags(server, data), *BATCH, *prices, "--resume"],
                          tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_every_record_once(resumed, data)
    assert sum(len(e.custom_ids) for e in read_entries(str(tmp_path / "out"))) == 12


def test_hostile_result_lines_cost_their_request_only():
    """A torn or non-object line in a result file is skipped (its request counts as without a
    result, a typed failure), never a crash of the collection."""
    from beam_caption.transforms.batch import json_lines

    data = b'{"custom_id": "a"}\n{"custom_id": "b", "resp\n[1, 2]\n"text"\n\n{"custom_id": "c"}\n'
    assert list(json_lines(data)) == [{"custom_id": "a"}, {"custom_id": "c"}]
