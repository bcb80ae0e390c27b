"""report.html's quality section (issue 25): the answer checks' counts, the prompt cache's
share and a judge's scores (``caption_meta.quality``), with the lowest-scoring records beside
their images; from outputs written by hand (hostile ones too) and from a real run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import TEST_RUNNER, run_cli
from PIL import Image
from test_report import CSP_META, shown
from test_report import chromium as chromium  # the fixture

from beam_caption.cli.report import MAX_LOWEST, MAX_QUALITY_NAMES, write_report
from beam_caption.testing import FakeVLMConfig, FakeVLMServer

MARKUP = "<script>window.pwned=3</script>"
JUDGED = 30


def quality(i: int) -> dict:
    """Record i's verdict: score i / 3 against a threshold of 4; those under it re-captioned
    (their first answer held markup and scored lower)."""
    score = i / 3
    judged = {"judge": "judge", "of": "caption", "score": score, "threshold": 4,
              "recaptioned": score < 4, "model": "big-vlm" if score < 4 else "small-vlm"}
    if judged["recaptioned"]:
        judged.update(first_answer=f"first {i} {MARKUP}", first_score=score / 2,
                      first_model="small-vlm")
    return judged


def write_output(out: Path, captions: list[dict], summary: dict) -> str:
    """An output directory by hand: summary.json and one captions file, images beside it."""
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({
        "records": len(captions), "captioned": len(captions), "failed": 0,
        "options": {"model": "small-vlm", "api_url": "http://127.0.0.1:9/v1",
                    "image_root": str(out)}, **summary}))
    (out / "captions-00000-of-00001.jsonl").write_text(
        "".join(json.dumps(c) + "\n" for c in captions))
    return str(out)


def judged_output(tmp_path: Path) -> str:
    captions = []
    for i in range(JUDGED):
        Image.new("RGB", (40, 30), (8 * i, 90, 200)).save(tmp_path / f"{i}.png")
        captions.append({"image": f"../{i}.png", "caption": f"caption {i} {MARKUP}",
                         "caption_meta": {"key": f"m.jsonl#{i}", "quality": quality(i)}})
    return write_output(tmp_path / "out", captions, {
        "answers_rejected": {"degenerate": 3, "refusal": 1, "schema": 2},
        "failed_by_type": {"response/degenerate": 2, "response/too_short": 1,
                           "image/image_not_found": 4},
        "tokens": {"prompt": 1000, "cached": 400}, "cached_share": 0.4})


def section(page: str, start: str, end: str) -> str:
    return page[page.index(start):page.index(end)]


def test_the_quality_section_counts_checks_cache_and_scores_with_the_lowest_beside_images(
        tmp_path):
    page = Path(write_report(judged_output(tmp_path), sample=4)).read_text(encoding="utf-8")
    checks = section(page, "<h3>Answer checks</h3>", "<h3>Prompt cache</h3>")
    for label, kind, rejected, failed in (("repetition loop", "degenerate", 3, 2),
                                          ("refusal", "refusal", 1, 0),
                                          ("too short", "too_short", 0, 1),
                                          ("schema", "schema", 2, 0)):
        assert (f"<tr><td>{label}</td><td>response/{kind}</td><td class=\"n\">{rejected}</td>"
                f"<td class=\"n\">{failed}</td></tr>") in checks
    assert "400 of 1,000 prompt tokens served from the server's prefix cache (40.0% of them)" \
        in page
    below = sum(quality(i)["recaptioned"] for i in range(JUDGED))
    assert (f"{JUDGED} captions judged (judge of caption); threshold 4: {below} re-captioned, "
            f"{below} kept under their threshold.") in page
    judge = section(page, "<h3>Judge</h3>", "<h3>Lowest scores</h3>")
    assert judge.count('class="chart"') == 2  # kept answers, first answers
    lowest = section(page, "<h3>Lowest scores</h3>", "<h2>Charts</h2>")
    scores = [float(s) for s in re.findall(r"score <b>([\d.e+-]+)</b>", lowest)]
    assert scores == pytest.approx(sorted(i / 3 for i in range(JUDGED))[:MAX_LOWEST], rel=1e-5)
    assert lowest.count("<figure>") == lowest.count('<img src="data:image/') == MAX_LOWEST
    assert f"first 0 {MARKUP}" not in page and "first 0 &lt;script&gt;" in lowest
    assert "re-captioned: first answer of small-vlm, score 0</summary>" in lowest
    assert "answer of big-vlm" in lowest and "<script" not in page
    assert page.count("<figure>") == 4 + MAX_LOWEST  # the sample, then the lowest


def test_the_lowest_are_shown_by_the_browser_and_nothing_in_them_runs(tmp_path, chromium):
    report = Path(write_report(judged_output(tmp_path), sample=4))
    page = shown(chromium, report, tmp_path)
    assert page["pwned"] is None and page["scripts"] == 1  # the probe itself
    assert page["images"] == page["decoded"] == 4 + MAX_LOWEST
    assert page["charts"] == 2
    assert "answers refused, then asked again" in page["text"]


def test_older_outputs_say_what_they_did_not_record_and_show_no_judge(tmp_path):
    out = write_output(tmp_path / "out", [{"image": "a.png", "caption": "c",
                                           "caption_meta": {"key": "k"}}], {})
    page = Path(write_report(out)).read_text(encoding="utf-8")
    assert "Refused answers not recorded" in page
    assert "Cached prompt tokens not recorded" in page
    assert "<h3>Judge</h3>" not in page and "Lowest scores" not in page
    assert '<td>response/degenerate</td><td class="n">n/a</td><td class="n">0</td>' in page


def test_hostile_quality_meta_is_bounded_escaped_and_never_breaks_the_page(tmp_path):
    odd = ["7", float("nan"), float("inf"), 1e308, True, None, [1], {"a": 1}]
    captions = [{"image": "none.png", "caption": "c", "caption_meta": {
        "key": f"k{i}", "quality": {"score": value, "threshold": value, "recaptioned": "yes",
                                    "judge": "<b>j</b>" * 10_000, "of": i}}}
        for i, value in enumerate(odd)]
    captions += [{"image": "none.png", "caption": "c", "caption_meta": {
        "key": f"n{i}", "quality": {"score": -i, "judge": f"judge{i}", "of": "c",
                                    "recaptioned": True, "first_answer": {"x": MARKUP},
                                    "first_score": "low", "first_model": ["m"]}}}
        for i in range(50)]
    captions += [{"caption_meta": {"key": "q", "quality": "not an object"}},
                 {"caption_meta": {"key": "r", "quality": []}}]
    out = write_output(tmp_path / "out", captions, {
        "answers_rejected": {f"kind{i}" * 50: "many" for i in range(500)},
        "failed_by_type": "x", "tokens": {"prompt": "p", "cached": 10**300},
        "cached_share": float("nan")})
    page = Path(write_report(out, sample=0)).read_text(encoding="utf-8")
    assert len(page.encode()) < 300_000
    assert "<b>j</b>" not in page and "&lt;b&gt;j&lt;/b&gt;" in page and "<script" not in page
    judged = len(odd) + 50
    assert f"{judged} captions judged" in page
    assert "have no score that is a number" in page
    assert page.count("<figure>") == MAX_LOWEST  # -49 .. -38
    scores = re.findall(r"score <b>([\d.e+-]+)</b>", page)
    assert scores[0] == "-49" and len(scores) == MAX_LOWEST
    judges = section(page, "captions judged (", "); threshold")
    assert judges.count(" of ") == MAX_QUALITY_NAMES
    assert "re-captioned: first answer of [&#x27;m&#x27;], score n/a" in page


def test_a_real_run_shows_the_loops_it_refused_and_its_cached_share(dataset_factory, tmp_path):
    data = dataset_factory(6, files=1)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(json.dumps({"caption": {"prompt": "Describe the image."},
                                   "short": {"prompt": "Describe it in five words."}}))
    with FakeVLMServer(FakeVLMConfig(rate_loop=1)) as server:
        result = run_cli([*TEST_RUNNER, "--input", data.manifests[0], "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--prompts_file", str(prompts), "--max_backoff", "0.01"],
                         tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.summary
    assert summary["answers_rejected"] == {"degenerate": 12}  # each prompt's first answer
    page = Path(write_report(str(result.output))).read_text(encoding="utf-8")
    assert CSP_META.search(page) and "<script" not in page
    assert ('<tr><td>repetition loop</td><td>response/degenerate</td><td class="n">12</td>'
            '<td class="n">0</td></tr>') in page
    cached, prompt = summary["tokens"]["cached"], summary["tokens"]["prompt"]
    assert cached > 0  # the retries and the second prompts share the first one's prefix
    assert (f"{cached:,} of {prompt:,} prompt tokens served from the server's prefix cache "
            f"({cached / prompt:.1%} of them)") in page
    assert "<h3>Judge</h3>" not in page  # nothing judged
