"""Batch mode against a hostile Batch API (issue 22): whole batches expired, result lines and
batch objects of undocumented shapes, result files that never end, batches that never end, and
identical records. The fake server's BatchModes drive the real code over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import RunResult, run_cli
from test_batch import BATCH, job_flags
from test_end_to_end import check_every_record_once

from beam_caption.cli.batch_launch import poll
from beam_caption.cli.main import main
from beam_caption.core.batch_api import CANCEL_RETRIES, INVALID, BatchAPI, batch_state
from beam_caption.core.ledger import (
    CANCEL_ASKED,
    CANCEL_ENDED,
    CANCEL_FAILED,
    LedgerEntry,
    entry_name,
    read_entries,
    write_entry,
)
from beam_caption.testing import FakeVLMServer
from beam_caption.testing.fake_batches import set_batch_modes
from beam_caption.transforms.batch import request_line, result_line


def run_batch(capsys, server, data, out, *flags: str, command: tuple = ()) -> RunResult:
    """The CLI in this process (a run that may hang goes through run_cli, with a timeout)."""
    code = main([*command, *job_flags(server, data), *BATCH, *flags, "--output", str(out)])
    captured = capsys.readouterr()
    return RunResult(code, captured.out, captured.err, out)


def error_types(run: RunResult) -> dict[str, str]:
    return {f["record"]["id"]: f"{f['error']['stage']}/{f['error']['type']}"
            for f in run.failures}


@pytest.mark.parametrize("records, per_batch", [(1, 50_000), (4, 2)])
def test_retry_failed_and_resume_submit_again_a_batch_that_expired_whole(
        capsys, dataset_factory, tmp_path, records, per_batch):
    data = dataset_factory(records, files=1)
    flags = ["--batch_max_requests", str(per_batch)]
    batches = -(-records // per_batch)
    with FakeVLMServer() as server:
        set_batch_modes(server.url, expire_first=1)  # the first batch: nothing answered
        retried = run_batch(capsys, server, data, tmp_path / "retried", *flags, "--retry_failed")
        assert server.stats()["events"]["batch"] == batches + 1  # the expired one's, again
        set_batch_modes(server.url, expire_first=1)
        server.reset_stats()
        expired = run_batch(capsys, server, data, tmp_path / "resumed", *flags)
        assert expired.returncode == 0, expired.stderr[-3000:]
        assert set(error_types(expired).values()) == {"request/batch_expired"}
        resumed = run_batch(capsys, server, data, tmp_path / "resumed", *flags, "--resume")
        assert server.stats()["events"]["batch"] == batches + 1
        again = run_batch(capsys, server, data, tmp_path / "resumed", *flags, "--resume")
        assert server.stats()["events"]["batch"] == batches + 1  # nothing left: nothing sent
    for run in (retried, resumed, again):
        assert run.returncode == 0, run.stderr[-3000:]
        check_every_record_once(run, data)
        assert not run.failures
    assert f"submitting again the {min(records, per_batch)} records" in retried.stderr


def test_a_retry_pass_names_its_files_apart_from_the_pass_it_retries():
    cids, fingerprints = ["k#0", "k#1"], ["f0", "f1"]
    first = entry_name(cids, fingerprints)
    assert first == entry_name(cids, fingerprints, "")  # ledgers of earlier versions hold
    retry = entry_name(cids, fingerprints, "batch_a")
    assert retry not in (first, entry_name(cids, fingerprints, "batch_b"))
    assert retry == entry_name(cids, fingerprints, "batch_a")  # a rerun finds its own


@pytest.mark.parametrize("line, kind", [
    ({"custom_id": ["x"], "response": {"status_code": 200, "body": {}}}, None),
    ({"custom_id": {"a": 1}}, None),
    ("text", None),
    ({"custom_id": "k", "response": "text"}, "response/batch_malformed_result"),
    ({"custom_id": "k", "response": None, "error": "text"}, "response/batch_malformed_result"),
    ({"custom_id": "k", "response": {"status_code": "200", "body": {}}},
     "response/batch_malformed_result"),
    ({"custom_id": "k", "response": {"status_code": 200, "body": "ok"}},
     "response/batch_malformed_result"),
    ({"custom_id": "k", "response": {"status_code": True, "body": {}}},
     "response/batch_malformed_result"),
    ({"custom_id": "k"}, "response/batch_malformed_result"),
    ({"custom_id": "k", "response": {"status_code": 500, "body": "oops"}}, "request/http_500"),
    ({"custom_id": "k", "response": None, "error": {"code": ["x"], "message": 5}},
     "request/batch_error"),
    ({"custom_id": "k", "response": None, "error": {"code": "x" * 10_000}},
     "request/batch_error"),
])
def test_every_result_line_shape_is_one_request_at_most(line, kind):
    checked = result_line(line)
    if kind is None:
        assert checked is None
    else:
        assert checked is not None and checked.body is None and checked.error is not None
        assert f"{checked.error.stage}/{checked.error.type}" == kind
        assert len(checked.error.message) <= 600


def test_malformed_result_lines_cost_their_request_in_collect_and_retry(
        capsys, dataset_factory, tmp_path):
    data = dataset_factory(4, files=1)
    out = tmp_path / "out"
    modes = {"line_fields": [{"custom_id": ["x"]}, {"response": "text"},
                             {"response": None, "error": "text"}],
             "extra_lines": ["[1, 2]", '{"custom_id": {"a": 1}}', '"x"', "{torn"]}
    with FakeVLMServer() as server:
        set_batch_modes(server.url, **modes)
        first = run_batch(capsys, server, data, out)
        for collected_file in [*out.glob("captions-*"), *out.glob("failures-*")]:
            collected_file.unlink()
        collected = run_batch(capsys, server, data, out, command=("collect",))
        assert server.stats()["events"]["batch"] == 1
        retried = run_batch(capsys, server, data, tmp_path / "retried", "--retry_failed")
        assert server.stats()["events"]["batch"] == 1 + 2  # the 3 failed, in one retry pass
    for run in (first, collected, retried):
        assert run.returncode == 0, run.stderr[-3000:]
        assert len(run.captions) == 1 and len(run.failures) == 3
        assert sorted(error_types(run).values()) == [
            "request/batch_missing_result", "response/batch_malformed_result",
            "response/batch_malformed_result"]


def test_an_endless_result_file_fails_its_records_typed_in_workers_and_launcher(
        dataset_factory, tmp_path):
    data = dataset_factory(3, files=1)
    with FakeVLMServer() as server:
        set_batch_modes(server.url, endless_results=True)
        run = run_cli([*job_flags(server, data), *BATCH, "--retry_failed",
                       "--batch_max_result_bytes", "200000"], tmp_path / "out", timeout=120)
        assert server.stats()["events"]["batch"] == 1  # answers not read are not paid again
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(error_types(run).values()) == {"response/batch_result_too_large"}
    assert len(run.failures) == 3 and not run.captions
    assert "over --batch_max_result_bytes" in run.stderr


def test_batch_objects_of_wrong_types_neither_crash_nor_lose_answers(
        capsys, dataset_factory, tmp_path):
    data = dataset_factory(3, files=1)
    with FakeVLMServer() as server:
        set_batch_modes(server.url, batch_fields={"completed_at": "soon", "errors": ["x"],
                                                  "request_counts": "many"})
        typed = run_batch(capsys, server, data, tmp_path / "typed")
        set_batch_modes(server.url, batch_fields={"status": None})
        null = run_batch(capsys, server, data, tmp_path / "null")
        set_batch_modes(server.url, batch_fields={"status": "paused", "output_file_id": 7})
        unknown = run_batch(capsys, server, data, tmp_path / "unknown")
    for run in (typed, null):  # what the batch answered is collected
        assert run.returncode == 0, run.stderr[-3000:]
        check_every_record_once(run, data)
        assert not run.failures
    assert "completed_at 'soon' is not a unix time" in typed.stderr
    assert "status None is not one of" in null.stderr
    assert unknown.returncode == 0, unknown.stderr[-3000:]
    assert set(error_types(unknown).values()) == {"request/batch_invalid"}
    lines = [line for line in unknown.stderr.splitlines() if "'paused'" in line]
    assert len(lines) == 1 and "output_file_id 7 is not an id" in lines[0]


def test_the_batch_object_check():
    assert batch_state(["x"]).status == INVALID
    assert batch_state({"id": "b", "status": None}).status == INVALID
    assert batch_state({"id": 5, "status": "completed"}).status == INVALID
    state = batch_state({"id": "b", "status": "completed", "completed_at": float("nan"),
                         "expired_at": 12, "errors": {"data": [{"message": "m" * 999}, 3]},
                         "request_counts": {"total": 2, "completed": -1, "failed": True}})
    assert (state.status, state.ended_at, state.request_counts) == ("completed", 12.0,
                                                                   {"total": 2})
    assert state.errors == ("m" * 500,) and len(state.problems) == 3


@pytest.mark.parametrize("stuck, files, outcome", [
    ("finalizing", {}, None),  # its output file is there: collected
    ("in_progress", {"output_file_id": None, "error_file_id": None}, "request/batch_timeout"),
])
def test_a_batch_that_never_ends_is_given_up_after_the_max_wait(
        dataset_factory, tmp_path, stuck, files, outcome):
    data = dataset_factory(3, files=1)
    with FakeVLMServer() as server:
        set_batch_modes(server.url, stuck_status=stuck, batch_fields=files)
        run = run_cli([*job_flags(server, data), *BATCH, "--batch_max_wait_hours", "0.001"],
                      tmp_path / "out", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.stderr.splitlines() if "given up" in line] == [
        line for line in run.stderr.splitlines() if f"is still {stuck}" in line]
    assert "given up (batch_timeout)" in run.stderr
    if outcome is None:
        check_every_record_once(run, data)
    else:
        assert set(error_types(run).values()) == {outcome} and len(run.failures) == 3
    (entry,) = read_entries(str(tmp_path / "out"))
    assert entry.status == "timeout"


def test_identical_records_are_sent_once_and_all_captioned(capsys, dataset_factory, tmp_path):
    data = dataset_factory(2, files=1)
    manifest = data.manifests[0]
    lines = open(manifest).read().splitlines()
    missing = {"id": "gone", "image": ["images/nope.png"],
               "conversation": [{"from": "human", "value": "q"}]}
    open(manifest, "w").write("\n".join(
        [lines[0], lines[0], lines[1], json.dumps(missing), json.dumps(missing)]) + "\n")
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        run = run_batch(capsys, server, data, out)
        (entry,) = read_entries(str(out))
        sent = BatchAPI(server.url, None).download(entry.file_id).splitlines()
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(sent) == len(entry.custom_ids) == 2  # one request per fingerprint
    first = json.loads(lines[0])["id"]
    captions = [c for c in run.captions if c["id"] == first]
    assert len(captions) == 2 and captions[0]["caption"] == captions[1]["caption"] == \
        data.expected[first]
    assert len(run.captions) == 3
    assert [f["error"]["type"] for f in run.failures] == ["image_not_found"] * 2
    assert len({f["key"] for f in run.failures}) == 2


WAIT_TINY = ["--batch_max_wait_hours", "0.0005"]  # 1.8 s


def test_a_batch_given_up_is_cancelled_once_its_answers_kept_and_only_the_rest_retried(
        dataset_factory, tmp_path):
    data = dataset_factory(4, files=1)
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        set_batch_modes(server.url, hold=True)  # in_progress until cancelled: half answered
        given_up = run_cli([*job_flags(server, data), *BATCH, *WAIT_TINY], out, timeout=120)
        assert given_up.returncode == 0, given_up.stderr[-3000:]
        assert server.stats()["events"]["cancel"] == 1
        (entry,) = read_entries(str(out))
        assert (entry.status, entry.cancel) == ("timeout", CANCEL_ENDED)
        assert len(given_up.captions) == 2  # what it answered before the cancel
        assert set(error_types(given_up).values()) == {"request/batch_timeout"}
        failed = sorted(f["key"] for f in given_up.failures)
        assert len(failed) == 2 and "cancelled" in given_up.failures[0]["error"]["message"]
        assert len([line for line in given_up.stderr.splitlines()
                    if "given up (batch_timeout) and cancelled" in line]) == 1
        set_batch_modes(server.url)
        retried = run_cli([*job_flags(server, data), *BATCH, *WAIT_TINY, "--resume",
                           "--retry_failed"], out, timeout=120)
        events = server.stats()["events"]
        assert events["cancel"] == 1 and events["batch"] == 2  # not cancelled again
    assert retried.returncode == 0, retried.stderr[-3000:]
    check_every_record_once(retried, data)
    assert not retried.failures
    first, retry = read_entries(str(out))
    assert first.name == entry.name and retry.batch_id != entry.batch_id
    assert sorted(retry.custom_ids) == failed  # only what the cancelled batch left


def test_a_cancel_that_fails_is_one_warning_and_never_asked_again(dataset_factory, tmp_path):
    data = dataset_factory(4, files=1)
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        set_batch_modes(server.url, hold=True, cancel_status=500)
        run = run_cli([*job_flags(server, data), *BATCH, *WAIT_TINY], out, timeout=120)
        assert server.stats()["events"]["cancel"] == 1 + CANCEL_RETRIES  # the SDK's, bounded
        for collected_file in [*out.glob("captions-*"), *out.glob("failures-*")]:
            collected_file.unlink()
        collected = run_cli(["collect", *job_flags(server, data), *BATCH, *WAIT_TINY], out,
                            timeout=120)
        assert server.stats()["events"]["cancel"] == 1 + CANCEL_RETRIES
    for result in (run, collected):
        assert result.returncode == 0, result.stderr[-3000:]
        assert set(error_types(result).values()) == {"request/batch_timeout"}
        assert len(result.failures) == 4 and not result.captions
    warnings = [line for line in run.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cancelling batch" in warnings[0]
    assert "HTTP 500" in warnings[0] and "may still run and be billed" in warnings[0]
    assert "warning" not in collected.stderr
    (entry,) = read_entries(str(out))
    assert (entry.status, entry.cancel) == ("timeout", CANCEL_FAILED)


def _held_batch(server, out, **fields) -> LedgerEntry:
    """A batch of 4 requests the fake holds in_progress, in a ledger as a launcher that died
    left it (``fields``)."""
    api = BatchAPI(server.url, None)
    body = {"model": "fake-vlm", "messages": [{"role": "user", "content": "hi"}]}
    lines = b"".join(request_line(f"k{i}", json.dumps(body).encode()) for i in range(4))
    file_id = api.upload(lines, "in.jsonl")
    entry = LedgerEntry("e", file_id, [f"k{i}" for i in range(4)], ["f"] * 4, time.time(),
                        batch_id=api.create(file_id, {}).id, **fields)
    write_entry(str(out), entry)
    return entry


def test_a_launcher_that_died_around_a_cancel_asks_it_once(tmp_path):
    out = tmp_path / "out"
    with FakeVLMServer() as server, ThreadPoolExecutor(1) as pool:
        set_batch_modes(server.url, hold=True)
        api = BatchAPI(server.url, None)
        # It died after giving the batch up, before cancelling it: the rerun cancels it.
        _held_batch(server, out, status="timeout", errors=["not ended"])
        (entry,) = pool.submit(poll, api, str(out), 0.05, 0.0, 60.0).result(timeout=60)
        assert server.stats()["events"]["cancel"] == 1
        assert entry.cancel == CANCEL_ENDED and entry.output_file_id  # half was answered
        # It died while waiting for the cancel's end: the rerun waits, and cancels nothing.
        entry.cancel = CANCEL_ASKED
        write_entry(str(out), entry)
        (entry,) = pool.submit(poll, api, str(out), 0.05, 0.0, 60.0).result(timeout=60)
        assert server.stats()["events"]["cancel"] == 1 and entry.cancel == CANCEL_ENDED
        # A cancel never ending is awaited a bounded time (min(CANCEL_WAIT_S, max_wait)).
        other = tmp_path / "other"
        _held_batch(server, other, status="timeout", cancel=CANCEL_ASKED,
                    cancel_asked_at=time.time())
        started = time.monotonic()
        (entry,) = pool.submit(poll, api, str(other), 0.05, 0.0, 1.0).result(timeout=60)
        assert entry.cancel == CANCEL_ENDED and time.monotonic() - started < 30
        assert server.stats()["events"]["cancel"] == 1
