"""python -m beam_caption report: the page a real small job gives, as headless Chromium shows it.

The browser tests need ``chromium`` (apt-get install chromium): without it they are skipped,
unless BEAM_CAPTION_REQUIRE_BROWSER=1 (as in CI) makes that a failure.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TEST_RUNNER, make_dataset, run_cli, run_main
from PIL import Image

from beam_caption.cli.report import MAX_BARS, MAX_BINS, _Bins, write_report
from beam_caption.testing import FakeVLMConfig, FakeVLMServer

# Markup in an image path and in every caption: the page must show it, never run it.
MARKUP_PATH = 'images/<img src=x onerror="window.pwned=1">.png'
MARKUP_CAPTION = "<script>window.pwned=2</script>"
CSP_META = re.compile(r'<meta http-equiv="Content-Security-Policy"[^>]*>')
# Appended to a copy of the page: writes what the browser shows into <pre id="probe">.
PROBE = """<script>addEventListener("load", () => {
  const bars = svg => [...svg.querySelectorAll("rect.bar")].some(r => r.getBBox().height > 0);
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: document.images.length,
    decoded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
    charts: [...document.querySelectorAll("svg.chart")].filter(bars).length,
    pwned: window.pwned ?? null,
    scripts: document.scripts.length,
    text: document.body.innerText});
  document.body.append(probe);
});</script>
"""
CAPTIONS, FAILURES = 31, 2  # make_dataset's 30 good records and the markup one; 2 bad ones


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """The output directory of a real job: 31 captions (one with markup in its image path,
    markup in every caption) and 2 failures (a missing image, a rejected request)."""
    root = tmp_path_factory.mktemp("report")
    data = make_dataset(root / "data", 30, bad_records=True)
    Image.new("RGB", (90, 60), (200, 30, 90)).save(data.root / MARKUP_PATH)
    with open(data.manifests[0], "a", encoding="utf-8") as manifest:  # the JSONL one
        manifest.write(json.dumps({"id": "markup", "image": [MARKUP_PATH], "conversation": [
            {"from": "human", "value": "Describe."}]}) + "\n")
    with FakeVLMServer(FakeVLMConfig(caption_suffix=MARKUP_CAPTION)) as server:
        result = run_cli([*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url",
                          server.url, "--model", "fake-vlm", "--image_root", str(data.root)],
                         root / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (len(result.captions), len(result.failures)) == (CAPTIONS, FAILURES)
    return result.output


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("BEAM_CAPTION_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{message}, and BEAM_CAPTION_REQUIRE_BROWSER=1 requires it")
        pytest.skip(f"{message}; BEAM_CAPTION_REQUIRE_BROWSER=1 makes this a failure")
    return path


def browse(chromium: str, page: Path, *args: str) -> str:
    """Run headless Chromium on ``page`` with ``args``; returns its stdout."""
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         f"--user-data-dir={page.parent / 'chromium-profile'}", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def shown(chromium: str, report: Path, tmp_path: Path) -> dict:
    """What the browser shows of ``report``: the probe's figures, from a copy of the page
    without its Content-Security-Policy (it would stop the probe, and would hide markup from
    the data that escaping failed to neutralise)."""
    page = tmp_path / "probed.html"
    page.write_text(CSP_META.sub("", report.read_text(encoding="utf-8")) + PROBE,
                    encoding="utf-8")
    dom = browse(chromium, page, "--dump-dom")
    probe = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert probe, dom[-2000:]
    return json.loads(html.unescape(probe.group(1)))


def test_page_shows_counts_failures_charts_thumbnails_and_escaped_text(job, chromium, tmp_path):
    report = Path(write_report(str(job), sample=40))
    assert report == job / "report.html"
    source = report.read_text(encoding="utf-8")
    assert CSP_META.search(source) and "<script" not in source
    assert not re.search(r'(src|href)="(?!data:)', source)  # self-contained
    page = shown(chromium, report, tmp_path)
    summary = json.loads((job / "summary.json").read_text())
    for label, value in (("records", 33), ("captioned", CAPTIONS), ("failed", FAILURES),
                         ("prompt tokens", summary["tokens"]["prompt"]),
                         ("total tokens", summary["tokens"]["total"])):
        assert f"{label}\t{value:,}" in page["text"], label
    assert "fake-vlm" in page["text"]
    # Each failure type, with its example's key and message.
    for stage, kind, record in (("image", "image_not_found", "missing"),
                                ("request", "content_policy", "rejected")):
        failure = next(f for f in map(json.loads, (job / "failures-00000-of-00001.jsonl")
                                      .read_text().splitlines()) if f["record"]["id"] == record)
        assert f"{stage}\t{kind}\t1\t{failure['key']}\t{failure['error']['message']}" in \
            page["text"]
    # Every captioned record on the sheet, each thumbnail decoded; latency, tokens and (when
    # the captions carry finished_at) throughput charts with bars.
    assert page["images"] == page["decoded"] == CAPTIONS
    timed = '"finished_at"' in (job / "captions-00000-of-00001.jsonl").read_text()
    assert page["charts"] == (4 if timed else 3)
    assert timed or "no caption_meta.finished_at" in page["text"]
    # Markup from records and answers is shown as text; none of it ran or made an element.
    assert page["pwned"] is None and page["scripts"] == 1  # the probe itself
    assert page["text"].count(MARKUP_CAPTION) == CAPTIONS
    assert MARKUP_PATH in page["text"]


def test_screenshot_is_not_blank(job, chromium, tmp_path):
    report = Path(write_report(str(job)))
    png = tmp_path / "report.png"
    browse(chromium, report, f"--screenshot={png}", "--window-size=1280,2400")
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(1 << 24)
    assert colours and len(colours) > 30, "the screenshot is (nearly) one colour"


def report_command(*args: str) -> subprocess.CompletedProcess:
    """``python -m beam_caption report ARGS``, run in this process."""
    argv = ["report", *args]
    return subprocess.CompletedProcess(argv, *run_main(argv, timeout=120))


def test_cli_writes_the_page_with_the_default_sample(job):
    done = report_command(str(job))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"report: {job}/report.html\n"
    assert (job / "report.html").read_text(encoding="utf-8").count("<img ") == 24


@pytest.mark.parametrize("make", [lambda d: None, lambda d: d.mkdir()],
                         ids=["no directory", "no summary"])
def test_cli_refuses_a_directory_that_is_no_job_output(tmp_path, make):
    make(tmp_path / "out")
    done = report_command(str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("beam_caption: error: ")
    assert "Traceback" not in done.stderr


def written_job(out: Path, captions: list[dict], output_keys: list[str] | None = None) -> str:
    """An output directory by hand: summary.json, gzipped captions, one failure without a
    record (a manifest line that was not JSON)."""
    out.mkdir()
    summary = {"records": len(captions) + 1, "captioned": len(captions), "failed": 1,
               "options": {"model": "m", "api_url": "http://127.0.0.1:9/v1",
                           "image_root": str(out.parent), "output_key": "caption"}}
    if output_keys:
        summary["output_keys"] = output_keys
    (out / "summary.json").write_text(json.dumps(summary))
    with gzip.open(out / "captions-00000-of-00001.jsonl.gz", "wt", encoding="utf-8") as lines:
        lines.writelines(json.dumps(c) + "\n" for c in captions)
    (out / "failures-00000-of-00001.jsonl").write_text(json.dumps(
        {"key": "m.jsonl#7", "source": {"file": "m.jsonl", "index": 7}, "raw": "{oops",
         "error": {"stage": "read", "type": "bad_json", "message": "line <7> is not JSON",
                   "attempts": 0, "retryable": False}}) + "\n")
    return str(out)


def test_structured_answers_unreadable_images_and_outputs_without_finished_at(tmp_path):
    Image.new("RGB", (400, 300), (0, 90, 200)).save(tmp_path / "big.jpg")
    captions = [{"image": "big.jpg", "caption": "a <b>blue</b> card",
                 "tags": {"objects": ["<i>card</i>"], "count": 1},
                 "caption_meta": {"key": "m.jsonl#0", "latency_ms": 12.5, "prompt_tokens": 80,
                                  "completion_tokens": None}},
                {"image": ["gone.png", "other.png"], "caption": "x", "tags": [],
                 "caption_meta": {"key": "m.jsonl#1", "latency_ms": 30.0}}]
    text = Path(write_report(written_job(tmp_path / "out", captions, ["caption", "tags"]),
                             sample=5)).read_text(encoding="utf-8")
    assert "<p>a &lt;b&gt;blue&lt;/b&gt; card</p>" in text
    assert ("<pre>{\n  &quot;objects&quot;: [\n    &quot;&lt;i&gt;card&lt;/i&gt;&quot;\n  ],\n"
            "  &quot;count&quot;: 1\n}</pre>") in text and "<pre>[]</pre>" in text
    assert text.count('<img src="data:image/') == 1  # big.jpg, shrunk to 192 px at most
    assert re.search(r'<div class="noimage">\[image/image_not_found\] [^<]*gone\.png', text)
    assert "gone.png (+1 more)" in text
    assert "read</td><td>bad_json</td><td class=\"n\">1</td><td>m.jsonl#7</td>" \
           "<td>line &lt;7&gt; is not JSON</td>" in text
    assert text.count('class="chart"') == 2  # latency, prompt tokens: no completion tokens
    assert "no caption_meta.finished_at" in text


def test_throughput_chart_and_a_seeded_sample(tmp_path):
    captions = [{"image": f"{i}.png", "caption": f"caption {i}",
                 "caption_meta": {"key": f"m.jsonl#{i}", "latency_ms": i,
                                  "finished_at": 1.7e9 + i / 10}} for i in range(60)]
    out = written_job(tmp_path / "out", captions)
    pages = [Path(write_report(out, sample=5, seed=seed)).read_text() for seed in (0, 0, 1)]
    assert pages[0] == pages[1] != pages[2]
    assert pages[0].count("<figure>") == 5
    assert pages[0].count('class="chart"') == 2  # latency and throughput
    assert "Captions per 0.1 s" in pages[0] and "no caption_meta.finished_at" not in pages[0]


def test_histograms_stay_bounded_however_spread_the_values():
    bins = _Bins(1.0)
    for value in range(0, 5_000_000, 50):
        bins.add(value)
    for value in (None, "7", True, float("nan")):
        bins.add(value)
    assert len(bins.counts) <= MAX_BINS and sum(bins.counts.values()) == 100_000
    bars = bins.bars()
    assert len(bars) <= MAX_BARS and sum(count for _, _, count in bars) == 100_000
    assert bars[0][0] <= 0 and bars[-1][1] > 4_999_950
