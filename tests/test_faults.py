"""Nothing lost: fault injection, bad input, fail-fast preflight and retried bundles, end to end."""

from __future__ import annotations

import collections
import functools
import gzip
import json

import httpx2
import openai
import pytest
from conftest import TEST_RUNNER, make_image, run_cli
from PIL import Image

from beam_caption.cli import preflight as preflight_module
from beam_caption.cli.preflight import _preflight_error
from beam_caption.core import client as client_module
from beam_caption.core.client import ClientSettings, OverloadThrottle
from beam_caption.testing import FakeVLMConfig, FakeVLMServer


def base_args(data, server, *extra):
    return [*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
            "--model", "fake-vlm", "--image_root", str(data.root), *extra]


def assert_exactly_once(result, data):
    ids = [r["id"] for r in result.captions] + [f["record"]["id"] for f in result.failures]
    duplicates = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not duplicates, duplicates
    assert sorted(ids) == sorted([*data.expected, *data.bad])


def test_mixed_fault_load_ends_with_every_record_captioned_once(dataset_factory, tmp_path):
    data = dataset_factory(300, files=3)
    faults = FakeVLMConfig(rate_500=0.10, rate_429=0.05, rate_reset=0.02, rate_malformed=0.02,
                           rate_empty=0.01, rate_html=0.01, rate_hang=0.01, hang_seconds=30,
                           retry_after_ms=50, seed=7)
    with FakeVLMServer(faults) as server:
        result = run_cli(base_args(data, server, "--max_concurrency", "32", "--max_retries", "10",
                                   "--request_timeout", "1", "--max_backoff", "0.5"),
                         tmp_path / "out")
        stats = server.stats()
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exactly_once(result, data)
    assert result.failures == []
    assert {r["id"]: r["caption"] for r in result.captions} == data.expected
    # Faults really happened and were retried per record: the retries reported add up.
    assert sum(stats["faults"].values()) > 30
    attempts = sum(r["caption_meta"]["attempts"] for r in result.captions)
    assert attempts == stats["requests"]
    assert result.summary["retries"] == attempts - 300 > 30
    assert max(r["caption_meta"]["attempts"] for r in result.captions) >= 2


BAD_INPUTS = {
    "missing_file": ({"image": "images/missing.png"}, "image", "image_not_found"),
    "empty_list": ({"image": []}, "read", "no_images"),
    "no_image_key": ({"picture": "x.png"}, "read", "missing_image_key"),
    "text_as_png": ({"image": "bad/text.png"}, "image", "not_an_image"),
    "truncated_jpeg": ({"image": "bad/truncated.jpg"}, "image", "truncated_image"),
    "bomb": ({"image": "bad/bomb.png"}, "image", "decompression_bomb"),
    "too_big": ({"image": "bad/big.bmp"}, "image", "image_too_large"),
    "unsupported": ({"image": "bad/icon.ico"}, "image", "unsupported_format"),
    "no_prompt": ({"image": "images/img00001.png", "conversation": [{"from": "gpt", "value": "x"}]},
                  "read", "no_prompt"),
    "rejected": ({"image": "images/img00001.png",
                  "conversation": [{"from": "human", "value": "REJECT_400"}]},
                 "request", "content_policy"),
}


def make_bad_files(root):
    bad = root / "bad"
    bad.mkdir()
    (bad / "text.png").write_text("this is not an image")
    Image.new("RGB", (400, 300), (10, 200, 30)).save(bad / "full.jpg", quality=95)
    data = (bad / "full.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[:len(data) // 2])
    # 13000 x 13000 = 169 MP > Pillow's 89 MP limit; a 1-bit PNG of that is tiny.
    Image.new("1", (13000, 13000)).save(bad / "bomb.png")
    Image.new("RGB", (700, 700), (1, 2, 3)).save(bad / "big.bmp")  # ~1.4 MB
    Image.new("RGB", (32, 32), (0, 0, 255)).save(bad / "icon.ico")


def test_every_bad_input_is_a_typed_failure_and_the_rest_is_captioned(dataset_factory, tmp_path):
    data = dataset_factory(6, files=1)
    make_bad_files(data.root)
    lines = [json.dumps({"id": name, "conversation": [{"from": "human", "value": "q"}], **record})
             for name, (record, _, _) in BAD_INPUTS.items()]
    lines += ["{this is not json", "[1, 2, 3]"]
    manifest = data.root / "bad.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    with gzip.open(data.root / "good.jsonl.gz", "wt") as handle:
        handle.write((data.root / "manifest0.jsonl").read_text())
    data.manifests = [str(data.root / "good.jsonl.gz"), str(manifest)]
    with FakeVLMServer() as server:
        result = run_cli(base_args(data, server, "--max_image_bytes", "1000000"), tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["id"]: r["caption"] for r in result.captions} == data.expected
    failures = {f["record"]["id"] if "record" in f else f["key"]: f for f in result.failures}
    for name, (_, stage, error_type) in BAD_INPUTS.items():
        error = failures[name]["error"]
        expected = (stage, error_type, False)
        assert (error["stage"], error["type"], error["retryable"]) == expected, name
        assert error["message"]
    malformed = failures[f"{manifest}#{len(BAD_INPUTS)}"]
    assert malformed["raw"] == "{this is not json" and "line 11" in malformed["error"]["message"]
    assert failures[f"{manifest}#{len(BAD_INPUTS) + 1}"]["error"]["type"] == "record_not_object"
    summary = result.summary
    assert summary["records"] == 6 + len(BAD_INPUTS) + 2
    assert summary["failed_by_type"]["read/malformed_json"] == 1
    assert summary["failed_by_stage"]["image"] == 6


def test_429_storm_is_throttled_client_side_and_reported(dataset_factory, tmp_path,
                                                        monkeypatch):
    # The throttle's window shrunk from 10 s to 1 s (and its waits with it): each retry waits
    # for 429s to leave the window, so the job takes ~3 s instead of ~30 s, throttled alike.
    monkeypatch.setattr(client_module, "OverloadThrottle",
                        functools.partial(OverloadThrottle, window_ms=1000, bucket_ms=100))
    monkeypatch.setattr(client_module, "THROTTLE_DELAY_S", 0.05)
    data = dataset_factory(8, files=1)
    with FakeVLMServer(FakeVLMConfig(rate_429=1.0)) as server:
        result = run_cli(base_args(data, server, "--max_retries", "3", "--max_backoff", "0.2",
                                   "--max_concurrency", "8"), tmp_path / "out")
        requests = server.stats()["requests"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert {f["error"]["type"] for f in result.failures} == {"http_429"}
    assert all(f["error"]["retryable"] and f["error"]["attempts"] == 4 for f in result.failures)
    assert requests == 8 * 4  # every attempt counted once, none hidden in the SDK
    summary = result.summary
    assert summary["failed_by_type"] == {"request/http_429": 8}
    assert summary["throttled_s"] > 0  # the client held requests back instead of hammering
    assert "throttled" in result.stdout


def test_max_requests_per_minute_spaces_requests(dataset_factory, tmp_path):
    data = dataset_factory(5, files=1)
    with FakeVLMServer() as server:
        result = run_cli(base_args(data, server, "--max_requests_per_minute", "300"),
                         tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.captions) == 5
    assert result.summary["throttled_s"] >= 4 * 0.2 * 0.9  # 5 starts, 0.2 s apart


@pytest.mark.parametrize("config, flags, message", [
    (FakeVLMConfig(api_key="right-key"), [], "refused the API key (HTTP 401)"),
    (FakeVLMConfig(models=("other-model",)), [], "'fake-vlm' is not served"),
])
def test_preflight_fails_fast_with_one_clear_line(dataset_factory, tmp_path, config, flags,
                                                  message):
    data = dataset_factory(3, files=1)
    with FakeVLMServer(config) as server:
        result = run_cli(base_args(data, server, *flags), tmp_path / "out",
                         env={"DF_API_KEY": "wrong-key"}, timeout=60)
        assert server.stats()["images"] == 0  # no record was sent
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "wrong-key" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_preflight_error_quotes_the_servers_message():
    request = httpx2.Request("GET", "http://127.0.0.1:9/v1/models")
    body = {"message": "model registry is down", "type": "server_error"}
    error = openai.InternalServerError("Error code: 500", body=body,
                                       response=httpx2.Response(500, request=request, json=body))
    message = str(_preflight_error(ClientSettings(api_url="http://127.0.0.1:9/v1", model="m"),
                                   error))
    assert message == "http://127.0.0.1:9/v1 answered HTTP 500: model registry is down"


def test_preflight_connection_refused(dataset_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight_module, "PREFLIGHT_BACKOFF_S", 0.05)  # 3 retries: 7 s -> 0.35 s
    data = dataset_factory(1, files=1)
    with FakeVLMServer() as server:
        url = server.url  # the port is closed once the server stops
    result = run_cli([*TEST_RUNNER, "--input", data.manifests[0], "--api_url", url,
                      "--model", "fake-vlm", "--image_root", str(data.root)],
                     tmp_path / "out", timeout=60)
    assert result.returncode == 2 and "cannot reach" in result.stderr


def test_skip_preflight_turns_systemic_errors_into_failures(dataset_factory, tmp_path):
    data = dataset_factory(3, files=1)
    with FakeVLMServer(FakeVLMConfig(api_key="right-key")) as server:
        result = run_cli(base_args(data, server, "--skip_preflight"), tmp_path / "out",
                         env={"DF_API_KEY": "wrong-key"})
    assert result.returncode == 0
    assert [f["error"]["type"] for f in result.failures] == ["http_401"] * 3


def test_retried_bundles_never_duplicate_output_lines(dataset_factory, tmp_path):
    data = dataset_factory(20, files=2)
    with FakeVLMServer() as server:
        result = run_cli(base_args(data, server, "--direct_runner_bundle_repeat=1"),
                         tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exactly_once(result, data)
    assert {r["id"]: r["caption"] for r in result.captions} == data.expected


def test_make_image_helper_gives_distinct_captions(tmp_path):
    captions = [make_image(tmp_path, i)[1] for i in range(648)]
    assert len(set(captions)) == 648


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_revoked_key_or_model_mid_run_stops_the_job_and_resume_finishes(dataset_factory,
                                                                          tmp_path, status):
    data = dataset_factory(60, files=1)
    out = tmp_path / "out"
    refusing = FakeVLMConfig(refuse_after=20, refuse_status=status, latency_ms=5)
    with FakeVLMServer(refusing) as server:
        stopped = run_cli(base_args(data, server, "--max_concurrency", "2",
                                    "--checkpoint_interval", "0.1"), out)
        stats = server.stats()
        sent = stats["requests"]
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert f"HTTP {status}" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    # It stopped after a short run of refusals: 5 in a row, or twice that when a success that
    # was in flight (--max_concurrency 2) broke the first run.
    assert stats["by_status"][str(status)] <= 2 * 5 + 2 and sent <= 20 + 2 + 12, stats
    assert not list(out.glob("captions-*")) and not list(out.glob("failures-*"))
    assert not list(out.glob("beam-temp-*"))
    with FakeVLMServer() as server:  # the key (or model) is back
        resumed = run_cli(base_args(data, server, "--resume"), out)
        paid_again = server.stats()["requests"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.failures == [] and {r["id"]: r["caption"] for r in resumed.captions} == \
        data.expected
    assert paid_again == 60 - resumed.summary["resumed"] and resumed.summary["resumed"] >= 15


def test_max_cost_stops_sending_at_the_budget_and_resume_continues(dataset_factory, tmp_path):
    data = dataset_factory(30, files=1)
    out = tmp_path / "out"
    # $1 a prompt token: every answer costs tens of dollars, so $150 buys a handful of them.
    prices = ["--price_per_million_input_tokens", "1000000"]
    with FakeVLMServer(FakeVLMConfig(latency_ms=5)) as server:
        stopped = run_cli(base_args(data, server, "--max_concurrency", "1", "--max_cost", "150",
                                    "--checkpoint_interval", "0.01", *prices), out)
        paid = server.stats()["requests"]
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "--max_cost is spent" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert 1 <= paid < 30
    with FakeVLMServer() as server:
        resumed = run_cli(base_args(data, server, "--resume", *prices), out)
        paid_again = server.stats()["requests"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {r["id"]: r["caption"] for r in resumed.captions} == data.expected
    assert paid_again == 30 - resumed.summary["resumed"]  # every kept caption is reused
    # Nothing queued is sent once the budget is spent; at most the answer in flight when it
    # ran out is paid again.
    assert paid + paid_again - 30 <= 1
    cost = resumed.summary["cost"]
    assert cost["input"] == resumed.summary["tokens"]["prompt"] and cost["output"] == 0
    assert f"cost ${cost['total']:,.4f}" in resumed.stdout


def test_max_cost_needs_prices(dataset_factory, tmp_path):
    data = dataset_factory(1, files=1)
    result = run_cli([*TEST_RUNNER, "--input", data.manifests[0], "--api_url",
                      "http://127.0.0.1:9/v1", "--model", "m", "--max_cost", "5"],
                     tmp_path / "out")
    assert result.returncode == 2 and "--max_cost needs the model's prices" in result.stderr


@pytest.mark.parametrize("hostile", [
    FakeVLMConfig(caption_suffix="\ud800"),
    FakeVLMConfig(usage={"prompt_tokens": "12", "completion_tokens": float("nan")}),
    FakeVLMConfig(usage={"prompt_tokens": 10**31, "completion_tokens": float("inf")}),
], ids=["lone_surrogate", "string_and_nan_usage", "huge_and_infinite_usage"])
def test_one_hostile_answer_value_never_kills_the_job(dataset_factory, tmp_path, hostile):
    data = dataset_factory(6, files=2)
    out = tmp_path / "out"
    with FakeVLMServer(hostile) as server:
        result = run_cli(base_args(data, server), out)
        assert result.returncode == 0, result.stderr[-3000:]
        again = run_cli(base_args(data, server, "--resume"), out)
    assert again.returncode == 0, again.stderr[-3000:]
    for run in (result, again):
        assert len(run.captions) == 6 and run.failures == []
        for path in out.glob("*.jsonl"):
            path.read_text(encoding="utf-8")  # strict UTF-8 throughout
    captions = {r["id"]: r["caption"] for r in result.captions}
    suffix = "\ufffd" if hostile.caption_suffix else ""
    assert captions == {key: value + suffix for key, value in data.expected.items()}
    if hostile.usage:  # charged at the worst case, and said so
        assert all(r["caption_meta"]["usage_estimated"] for r in result.captions)
        assert result.summary["usage_estimated"] == 6 and result.summary["tokens"]["total"] > 0
