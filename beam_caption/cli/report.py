"""``python -m beam_caption report OUTDIR``: OUTDIR/report.html, one page to judge a caption job.

The page shows summary.json's counts, the failures by stage and type with one example each,
the answers' quality, histograms of latency and tokens, captions over time, and a contact sheet:
a seeded sample of captioned records with a thumbnail of their first image and their answers.
The quality section counts what each answer check refused (answers asked again, records failed),
the share of prompt tokens the server served from its prefix cache and, when captions were
judged (``caption_meta.quality``), the judge's scores as histograms and the MAX_LOWEST
lowest-scoring records beside their images, with the first answer of the re-captioned ones.
The image of a record from a WebDataset shard or from a Parquet table's image bytes is read
back from its source (core/dataset_images.py): each file once, a shard only up to the last
sample shown, a table only in the row groups shown; a source that cannot be read, or is over
http(s), gets the box a missing image gets.

It is self-contained (charts are inline SVG, thumbnails data URLs, no script) and its
Content-Security-Policy forbids scripts and every outside address. Records and answers are
untrusted: all their text is escaped. The output files are streamed: memory holds counters,
bounded histograms and the sample, however many records the job had. Beam is not imported
(core/outputs.py reads every output format without it), so the command starts at once.

The output may be foreign or hand-edited, so the page is bounded whatever it holds: a value a
chart cannot place (not a number, negative, over MAX_VALUE) is counted as not shown, the
failures table shows the MAX_FAILURE_ROWS most frequent kinds and one "others" row, every text
shown is cut at a MAX_*_CHARS length, and a line or file that cannot be read is skipped and
counted on the page.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html import escape

import fsspec

from beam_caption.core.dataset_images import SourceImage, image_source, read_source_images
from beam_caption.core.errors import CaptionError, UsageError
from beam_caption.core.http_images import UrlGuard
from beam_caption.core.images import (
    DEFAULT_HTTP_TIMEOUT_S,
    ImageSettings,
    prepare_image_bytes,
    read_image_bytes,
    resolve_image_path,
)
from beam_caption.core.outputs import (
    CAPTIONS_PREFIX,
    FAILURES_PREFIX,
    REPORT_FILE,
    SUMMARY_FILE,
    Unread,
    read_output_records,
)

THUMBNAIL_SETTINGS = ImageSettings(max_side=192, jpeg_quality=80)  # JPEG; PNG if <= 256 colours
THUMBNAIL_THREADS = 8  # images read at once (remote ones wait on the network)
MAX_BINS = 1024  # bins a histogram keeps before doubling their width
MAX_BARS = 40  # bars a chart draws
MAX_VALUE = 1e12  # larger values (ms, tokens, unix seconds) are not charted: a year 33658 clock
MAX_FAILURE_KINDS = 10_000  # (stage, type) pairs counted apart; later new ones count as others
MAX_FAILURE_ROWS = 50  # rows of the failures table before its "others" row
MAX_LABEL_CHARS = 100  # a stage, type, model, count or answer key shown
MAX_KEY_CHARS = 300  # a record key or image path shown
MAX_MESSAGE_CHARS = 500  # an example error message shown
MAX_ANSWER_CHARS = 2_000  # an answer shown on the contact sheet
MAX_DAMAGED_SHOWN = 10  # damaged files named on the page
MAX_LOWEST = 12  # lowest-scoring judged records shown beside their images
MAX_QUALITY_NAMES = 10  # judge, judged prompt and threshold values named
SCORE_BIN_WIDTH = 1 / 64  # of the score histograms (0..1 and 1..10 scales alike)
# summary.json's answers_rejected and failed_by_type response/TYPE: the answer checks
CHECKS = (("degenerate", "repetition loop"), ("refusal", "refusal"),
          ("too_short", "too short"))
# (label, summary.json field)
COUNTS = (("records", "records"), ("captioned", "captioned"), ("failed", "failed"),
          ("images captioned", "images_captioned"), ("resumed", "resumed"),
          ("cache hits", "cache_hits"), ("retries", "retries"),
          ("prompt tokens", "tokens.prompt"), ("completion tokens", "tokens.completion"),
          ("total tokens", "tokens.total"), ("cost (USD)", "cost.total"),
          ("wall time (s)", "wall_time_s"), ("images per s", "images_per_s"),
          ("throttled (s)", "throttled_s"))
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}
td.n{text-align:right}
.charts{display:flex;flex-wrap:wrap;gap:1.5em}
.chart .bar{fill:#4a7fb5}.chart text{font-size:11px;fill:#555}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1em}
figure{margin:0;border:1px solid #ddd;padding:.5em;overflow-wrap:anywhere}
figure img{display:block;margin:0 auto;max-width:100%}
.noimage{height:120px;background:#eee;color:#a00;display:flex;align-items:center;
 justify-content:center;text-align:center;padding:.5em;font-size:12px}
.path{color:#666;font-size:12px}
pre{white-space:pre-wrap;margin:0;font-size:12px}
.score{margin:.3em 0}details{font-size:12px;color:#555}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class _Bins:
    """A histogram of any number of values from 0 to MAX_VALUE in at most MAX_BINS bins of
    equal width: the width doubles (neighbouring bins merge) whenever the values spread over
    more. Other values given (not numbers, negative, too large) are counted in ``not_shown``."""

    def __init__(self, width: float) -> None:
        self.width = width
        self.counts: Counter[int] = Counter()
        self.not_shown = 0

    def add(self, value: object) -> None:
        """Count ``value`` if it is a number from 0 to MAX_VALUE; null (missing) is skipped."""
        if value is None:
            return
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 <= value <= MAX_VALUE):  # NaN fails the comparison too
            self.not_shown += 1
            return
        self.counts[math.floor(value / self.width)] += 1
        while len(self.counts) > MAX_BINS:
            self.width *= 2
            merged: Counter[int] = Counter()
            for index, count in self.counts.items():
                merged[index // 2] += count
            self.counts = merged

    def bars(self) -> list[tuple[float, float, int]]:
        """(start, end, count) of at most MAX_BARS equal bars from the lowest value to the
        highest."""
        if not self.counts:
            return []
        low, high = min(self.counts), max(self.counts)
        per = -(-(high - low + 1) // MAX_BARS)
        merged: Counter[int] = Counter()
        for index, count in self.counts.items():
            merged[(index - low) // per] += count
        return [((low + bar * per) * self.width, (low + (bar + 1) * per) * self.width,
                 merged[bar]) for bar in range((high - low) // per + 1)]


@dataclass(frozen=True)
class _Job:
    """What the page takes from summary.json, each value checked (the file may be edited)."""

    summary: dict
    options: dict
    image_key: str
    output_keys: list[str]

    @classmethod
    def of(cls, summary: object) -> _Job:
        """The job of a decoded summary.json; UsageError when it is no JSON object."""
        if not isinstance(summary, dict):
            raise UsageError(f"{SUMMARY_FILE} holds a JSON {type(summary).__name__}, not an "
                             "object: not a caption job's summary")
        options = summary.get("options")
        options = options if isinstance(options, dict) else {}
        image_key = options.get("image_key")
        keys = summary.get("output_keys")
        if not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
            output_key = options.get("output_key")
            keys = [output_key if isinstance(output_key, str) else "caption"]
        return cls(summary, options, image_key if isinstance(image_key, str) else "image", keys)


@dataclass
class _Stats:
    """What the page needs from the output lines, gathered one line at a time."""

    sample_size: int
    rng: random.Random
    job: _Job
    captions: int = 0
    sample: list[dict] = field(default_factory=list)  # sampled captions, cut to what is shown
    latency_ms: _Bins = field(default_factory=lambda: _Bins(1.0))
    prompt_tokens: _Bins = field(default_factory=lambda: _Bins(1.0))
    completion_tokens: _Bins = field(default_factory=lambda: _Bins(1.0))
    finished_at: _Bins = field(default_factory=lambda: _Bins(0.1))
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    other_failures: int = 0  # failures of kinds past MAX_FAILURE_KINDS
    examples: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    unread: Unread = field(default_factory=Unread)
    quality: _Quality = field(default_factory=lambda: _Quality())

    def add_caption(self, line: dict) -> None:
        """Count a captioned record and keep it in the sample with reservoir sampling."""
        self.captions += 1
        meta = _object(line.get("caption_meta"))
        self.latency_ms.add(meta.get("latency_ms"))
        self.prompt_tokens.add(meta.get("prompt_tokens"))
        self.completion_tokens.add(meta.get("completion_tokens"))
        self.finished_at.add(meta.get("finished_at"))
        if isinstance(meta.get("quality"), dict):
            self.quality.add(meta["quality"], lambda: self._shown(line))
        if len(self.sample) < self.sample_size:
            self.sample.append(self._shown(line))
        else:
            slot = self.rng.randrange(self.captions)
            if slot < self.sample_size:
                self.sample[slot] = self._shown(line)

    def _shown(self, line: dict) -> dict:
        """What the contact sheet shows of a caption line: its image paths, key and answers,
        each cut to its length (a line may hold megabytes), and the shard or table its image
        bytes are read back from (None for a manifest's record)."""
        key = str(_object(line.get("caption_meta")).get("key", ""))
        paths = _image_paths(line, self.job.image_key)
        return {"key": _cut(key, MAX_KEY_CHARS), "source": image_source(line, key),
                "paths": [_cut(paths[0], MAX_KEY_CHARS)] if paths else [],
                "more": max(len(paths) - 1, 0),
                "answers": {_cut(name, MAX_LABEL_CHARS): _answer_text(line[name])
                            for name in self.job.output_keys if name in line}}

    def add_failure(self, line: dict) -> None:
        """Count a failure by stage and type, keeping the first of each as the example; kinds
        past MAX_FAILURE_KINDS count in ``other_failures``."""
        error = _object(line.get("error"))
        kind = (_cut(str(error.get("stage", "?")), MAX_LABEL_CHARS),
                _cut(str(error.get("type", "?")), MAX_LABEL_CHARS))
        if kind not in self.failures and len(self.failures) >= MAX_FAILURE_KINDS:
            self.other_failures += 1
            return
        self.failures[kind] += 1
        self.examples.setdefault(kind, (_cut(str(line.get("key", "")), MAX_KEY_CHARS),
                                        _cut(str(error.get("message", "")), MAX_MESSAGE_CHARS)))


@dataclass
class _Quality:
    """What the judge said of the judged captions (``caption_meta.quality``): score histograms,
    the names and thresholds it used (MAX_QUALITY_NAMES of each) and the MAX_LOWEST
    lowest-scoring records. A score that is no finite number is counted in ``no_score``."""

    judged: int = 0
    recaptioned: int = 0
    below: int = 0  # kept answers that still score under their threshold
    no_score: int = 0
    scores: _Bins = field(default_factory=lambda: _Bins(SCORE_BIN_WIDTH))
    first_scores: _Bins = field(default_factory=lambda: _Bins(SCORE_BIN_WIDTH))
    names: Counter[str] = field(default_factory=Counter)  # "JUDGE of PROMPT"
    thresholds: Counter[str] = field(default_factory=Counter)
    lowest: list[tuple[float, int, dict]] = field(default_factory=list)  # a heap: -score, -n

    def add(self, quality: dict, shown: Callable[[], dict]) -> None:
        """Count one caption's ``quality``; keep it among the lowest (``shown()``: what the
        sheet shows of its line) when it scores under them."""
        self.judged += 1
        score, threshold = _score(quality.get("score")), _score(quality.get("threshold"))
        recaptioned = quality.get("recaptioned") is True
        self.recaptioned += recaptioned
        first = _score(quality.get("first_score")) if recaptioned else score
        self.scores.add(score)
        self.first_scores.add(first)
        _count_name(self.names, f"{_text(quality.get('judge'))} of {_text(quality.get('of'))}")
        if threshold is not None:
            _count_name(self.thresholds, f"{threshold:g}")
        if score is None:
            self.no_score += 1
            return
        self.below += threshold is not None and score < threshold
        if len(self.lowest) < MAX_LOWEST or -score > self.lowest[0][0]:
            card = {**shown(), "quality": {
                "score": score, "threshold": threshold, "recaptioned": recaptioned,
                "model": _text(quality.get("model")), "judge": _text(quality.get("judge")),
                "first_score": first, "first_model": _text(quality.get("first_model")),
                "first_answer": _answer_text(quality.get("first_answer", ""))}}
            entry = (-score, -self.judged, card)  # among equal scores, the first read stays
            if len(self.lowest) < MAX_LOWEST:
                heapq.heappush(self.lowest, entry)
            else:
                heapq.heapreplace(self.lowest, entry)

    def lowest_first(self) -> list[dict]:
        """The lowest-scoring records' cards, lowest first."""
        return [card for _, _, card in sorted(self.lowest, reverse=True)]


def _score(value: object) -> float | None:
    """A score or threshold as a number, None when it is no finite number within MAX_VALUE."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if -MAX_VALUE <= value <= MAX_VALUE else None  # NaN fails it too


def _text(value: object) -> str:
    """A name as shown: cut at MAX_LABEL_CHARS ("?" when missing)."""
    return _cut(str(value), MAX_LABEL_CHARS) if value is not None else "?"


def _count_name(names: Counter[str], name: str) -> None:
    """Count ``name`` unless MAX_QUALITY_NAMES others are counted already."""
    if name in names or len(names) < MAX_QUALITY_NAMES:
        names[name] += 1


def _object(value: object) -> dict:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _cut(text: str, limit: int) -> str:
    """``text``, cut at ``limit`` characters with a mark saying so."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more)"


@dataclass(frozen=True)
class _Images:
    """Reads images as the job did (its image root, size limit, timeout and URL guard)."""

    root: str
    max_bytes: int
    timeout: float
    guard: UrlGuard

    @classmethod
    def of(cls, options: dict) -> _Images:
        # No --image_root: paths were relative to the job's directory; guess it is this one.
        return cls(options.get("image_root") or ".",
                   options.get("max_image_bytes") or ImageSettings().max_bytes,
                   options.get("image_timeout") or DEFAULT_HTTP_TIMEOUT_S,
                   UrlGuard(bool(options.get("allow_private_urls"))))

    def thumbnail(self, data: bytes) -> str:
        """A data URL of the image ``data`` prepared as the job sends images (upright,
        transparency on white, 16-bit scaled), 192 pixels at most a side."""
        return prepare_image_bytes(data, THUMBNAIL_SETTINGS).data_url

    def html(self, path: str | None, data: SourceImage = None) -> str:
        """The thumbnail's <img> of the image bytes read back from a shard or table (``data``,
        when not None), else of the image at ``path``; or a box saying why there is none."""
        try:
            if isinstance(data, CaptionError):
                raise data
            if data is None:
                if path is None:
                    return '<div class="noimage">no image path in the record</div>'
                data = read_image_bytes(resolve_image_path(path, self.root), self.max_bytes,
                                        self.timeout, self.guard)
            return f'<img src="{self.thumbnail(data)}" alt="">'
        except Exception as exc:  # any failure on untrusted data costs one thumbnail only
            reason = str(exc) if isinstance(exc, CaptionError) else f"{type(exc).__name__}: {exc}"
            return f'<div class="noimage">{escape(reason)}</div>'


def _read_summary(output_dir: str) -> object:
    """summary.json of ``output_dir``, decoded; UsageError when the directory or the file is
    missing or not JSON."""
    filesystem, path = fsspec.core.url_to_fs(output_dir)
    if not filesystem.isdir(path):
        raise UsageError(f"{output_dir} is not a directory: give a caption job's --output")
    try:
        with fsspec.open(f"{output_dir.rstrip('/')}/{SUMMARY_FILE}", "rt",
                         encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UsageError(f"no {SUMMARY_FILE} in {output_dir}: not a caption job's output, or "
                         "its job has not finished") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{output_dir}/{SUMMARY_FILE} is not JSON: {exc}") from None


def _field(summary: dict, name: str) -> object:
    """summary[name], where "a.b" is field b of object a; None when missing."""
    value: object = summary
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _number(value: object) -> str:
    """A count as shown: thousands separated, "n/a" when missing."""
    if isinstance(value, bool) or value is None:
        return "n/a"
    if isinstance(value, int):
        return _cut(f"{value:,}", MAX_LABEL_CHARS)
    if isinstance(value, float):
        return f"{value:,.6g}"
    return escape(_cut(str(value), MAX_LABEL_CHARS))


def _counts_html(summary: dict) -> str:
    """The table of summary.json's counts."""
    rows = "".join(f"<tr><th>{label}</th><td class=\"n\">{_number(_field(summary, name))}</td>"
                   "</tr>" for label, name in COUNTS)
    return f"<h2>Counts</h2><table>{rows}</table>"


def _failures_html(stats: _Stats) -> str:
    """The failures by stage and type, the MAX_FAILURE_ROWS most frequent first with one
    example each, then one row for all the others."""
    if not stats.failures:
        return "<h2>Failures</h2><p>No failures.</p>"
    shown = stats.failures.most_common(MAX_FAILURE_ROWS)
    rows = "".join(
        f"<tr><td>{escape(stage)}</td><td>{escape(kind)}</td><td class=\"n\">{count:,}</td>"
        f"<td>{escape(stats.examples[stage, kind][0])}</td>"
        f"<td>{escape(stats.examples[stage, kind][1])}</td></tr>"
        for (stage, kind), count in shown)
    others = stats.other_failures + sum(stats.failures.values()) - sum(c for _, c in shown)
    if others:
        kinds = (f"{'more than ' if stats.other_failures else ''}"
                 f"{len(stats.failures) - len(shown):,}")
        rows += (f'<tr><td colspan="2">others ({kinds} kinds)</td><td class="n">{others:,}</td>'
                 "<td></td><td></td></tr>")
    return ("<h2>Failures</h2><table><tr><th>stage</th><th>type</th><th>count</th>"
            f"<th>example key</th><th>example message</th></tr>{rows}</table>")


def _unread_html(unread: Unread) -> str:
    """A note of what could not be read, if anything."""
    if not (unread.elements or unread.damaged):
        return ""
    named = list(unread.damaged.items())[:MAX_DAMAGED_SHOWN]
    files = "".join(f"<li>{escape(_cut(path, MAX_KEY_CHARS))}: "
                    f"{escape(_cut(reason, MAX_MESSAGE_CHARS))}</li>" for path, reason in named)
    more = len(unread.damaged) - len(named)
    return (f"<h2>Not read</h2><p>{unread.elements:,} lines that are not JSON objects were "
            f"skipped; {len(unread.damaged):,} files could not be read to their end"
            f"{f' ({more:,} not named here)' if more else ''}.</p>"
            + (f"<ul>{files}</ul>" if files else ""))


def _chart(title: str, bins: _Bins, unit: str, origin: float = 0.0) -> str:
    """An SVG bar chart of ``bins``, bar edges shown less ``origin``."""
    bars = bins.bars()
    not_shown = (f"<p>{bins.not_shown:,} values not shown (not a number from 0 to "
                 f"{MAX_VALUE:g}).</p>" if bins.not_shown else "")
    if not bars:
        return f"<div><h3>{escape(title)}</h3><p>No values.</p>{not_shown}</div>"
    width, height, margin = 480, 160, 16  # the bars' area; labels in the margins
    step, tallest = width / len(bars), max(count for _, _, count in bars)
    rects = "".join(
        f'<rect class="bar" x="{i * step:.1f}" y="{margin + height * (1 - count / tallest):.1f}" '
        f'width="{max(step - 1, 1):.1f}" height="{height * count / tallest:.1f}"><title>'
        f"{start - origin:,.6g} to {end - origin:,.6g} {unit}: {count:,}</title></rect>"
        for i, (start, end, count) in enumerate(bars) if count)
    bottom = margin + height + 13
    axis = (f'<text x="0" y="11">{tallest:,} at most</text>'
            f'<text x="0" y="{bottom}">{bars[0][0] - origin:,.6g} {unit}</text>'
            f'<text x="{width}" y="{bottom}" text-anchor="end">'
            f"{bars[-1][1] - origin:,.6g} {unit}</text>")
    size = f'width="{width}" height="{height + 2 * margin}"'
    return (f'<div><h3>{escape(title)}</h3><svg class="chart" {size} '
            f'viewBox="0 0 {width} {height + 2 * margin}">{rects}{axis}</svg>{not_shown}</div>')


def _charts_html(stats: _Stats) -> str:
    """Latency and token histograms, and captions over time when finished_at is known."""
    if stats.finished_at.counts:
        start = min(stats.finished_at.counts) * stats.finished_at.width
        throughput = _chart(f"Captions per {stats.finished_at.width:g} s", stats.finished_at,
                            "s", origin=start)
    else:
        throughput = ("<div><h3>Captions over time</h3><p>Not shown: these captions have no "
                      "caption_meta.finished_at (written by an older version).</p></div>")
    return ('<h2>Charts</h2><div class="charts">'
            + _chart("Latency per record", stats.latency_ms, "ms")
            + _chart("Prompt tokens per record", stats.prompt_tokens, "tokens")
            + _chart("Completion tokens per record", stats.completion_tokens, "tokens")
            + throughput + "</div>")


def _answer_text(value: object) -> tuple[bool, str]:
    """(whether structured, text shown) of an answer: a text answer as it is, a structured one
    (JSON object, list ...) as pretty JSON; cut at MAX_ANSWER_CHARS."""
    if isinstance(value, str):
        return False, _cut(value, MAX_ANSWER_CHARS)
    return True, _cut(json.dumps(value, indent=2, ensure_ascii=False), MAX_ANSWER_CHARS)


def _answer_html(answer: tuple[bool, str]) -> str:
    """A text answer as a paragraph, a structured one as preformatted JSON."""
    structured, text = answer
    return f"<pre>{escape(text)}</pre>" if structured else f"<p>{escape(text)}</p>"


def _image_paths(record: dict, image_key: str) -> list[str]:
    """The image paths of a record (its image field holds one path or a list)."""
    value = record.get(image_key)
    paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [path for path in paths if isinstance(path, str)]


def _card_html(shown: dict, thumbnail: str) -> str:
    """One record of the contact sheet: its thumbnail, first image path and answers (and for
    a judged record of the lowest-scoring, what the judge said, ``_verdict_html``)."""
    more = f" (+{shown['more']:,} more)" if shown["more"] else ""
    answers = "".join(f"<dt>{escape(key)}</dt><dd>{_answer_html(answer)}</dd>"
                      for key, answer in shown["answers"].items())
    path = shown["paths"][0] if shown["paths"] else shown["key"] if shown["source"] else ""
    verdict = _verdict_html(shown["quality"]) if "quality" in shown else ""
    return (f'<figure>{thumbnail}<figcaption><div class="path" title="{escape(shown["key"])}">'
            f"{escape(path)}{more}</div>{verdict}<dl>{answers}</dl></figcaption></figure>")


def _verdict_html(quality: dict) -> str:
    """A judged record's score (against its threshold) by its judge, the model of its answer,
    and when it was re-captioned the first model's answer and score."""
    threshold = "" if quality["threshold"] is None else f" (threshold {quality['threshold']:g})"
    verdict = (f'<p class="score">score <b>{quality["score"]:g}</b>{threshold} by '
               f"{escape(quality['judge'])}; answer of {escape(quality['model'])}</p>")
    if not quality["recaptioned"]:
        return verdict
    first = "n/a" if quality["first_score"] is None else f"{quality['first_score']:g}"
    return (f"{verdict}<details><summary>re-captioned: first answer of "
            f"{escape(quality['first_model'])}, score {first}</summary>"
            f"{_answer_html(quality['first_answer'])}</details>")


def _cards_html(stats: _Stats, shown: list[dict]) -> str:
    """Contact sheet cards of ``shown`` records, their thumbnails read a few at a time (the
    images of records from shards and tables read back from them, each file once)."""
    images = _Images.of(stats.job.options)
    sources = [card["source"] for card in shown if card["source"]]
    read_back = read_source_images(sources, stats.job.image_key, images.max_bytes,
                                   THUMBNAIL_THREADS)
    with ThreadPoolExecutor(THUMBNAIL_THREADS) as pool:
        thumbnails = pool.map(images.html,
                              [card["paths"][0] if card["paths"] else None for card in shown],
                              [read_back.get(card["source"].key) if card["source"] else None
                               for card in shown])
        return "".join(_card_html(card, thumbnail)
                       for card, thumbnail in zip(shown, thumbnails, strict=True))


def _sheet_html(stats: _Stats) -> str:
    """The contact sheet of the sampled records."""
    return (f"<h2>Contact sheet</h2><p>{len(stats.sample):,} of {stats.captions:,} captioned "
            f'records, sampled at random.</p><div class="sheet">{_cards_html(stats, stats.sample)}'
            "</div>")


def _quality_html(stats: _Stats) -> str:
    """The quality section: the answer checks' counts, the prompt cache's share and, when
    captions were judged, the judge's scores and the lowest-scoring records."""
    return ("<h2>Quality</h2>" + _checks_html(stats.job.summary)
            + _prompt_cache_html(stats.job.summary) + _judge_html(stats))


def _checks_html(summary: dict) -> str:
    """Per answer check: the answers it refused that a new attempt replaced
    (``answers_rejected``) and the records it failed (``failed_by_type`` response/TYPE)."""
    rejected, failed = _object(summary.get("answers_rejected")), \
        _object(summary.get("failed_by_type"))
    known = dict(CHECKS)
    kinds = [kind for kind, _ in CHECKS] + [kind for kind in list(rejected)[:MAX_FAILURE_ROWS]
                                            if kind not in known]
    recorded = "answers_rejected" in summary
    rows = "".join(
        f"<tr><td>{escape(known.get(kind) or _cut(kind, MAX_LABEL_CHARS))}</td>"
        f"<td>response/{escape(_cut(kind, MAX_LABEL_CHARS))}</td>"
        f'<td class="n">{_number(rejected.get(kind, 0) if recorded else None)}</td>'
        f'<td class="n">{_number(failed.get(f"response/{kind}", 0))}</td></tr>'
        for kind in kinds)
    return ("<h3>Answer checks</h3><table><tr><th>check</th><th>type</th><th>answers refused, "
            "then asked again</th><th>records failed</th></tr>" + rows + "</table>"
            + ("" if recorded else "<p>Refused answers not recorded (a summary of an older "
               "version).</p>"))


def _prompt_cache_html(summary: dict) -> str:
    """The prompt tokens the server served from its prefix cache, and their share."""
    cached, prompt = _field(summary, "tokens.cached"), _field(summary, "tokens.prompt")
    share = summary.get("cached_share")
    if cached is None:
        return ("<h3>Prompt cache</h3><p>Cached prompt tokens not recorded (a summary of an "
                "older version).</p>")
    shown = (f" ({share:.1%} of them)" if isinstance(share, int | float)
             and not isinstance(share, bool) and 0 <= share <= 1 else "")
    return (f"<h3>Prompt cache</h3><p>{_number(cached)} of {_number(prompt)} prompt tokens "
            f"served from the server's prefix cache{shown}.</p>")


def _judge_html(stats: _Stats) -> str:
    """The judge's scores: who judged what, how many were re-captioned or stay under their
    threshold, histograms, and the lowest-scoring records beside their images."""
    quality = stats.quality
    if not quality.judged:
        return ""
    names = ", ".join(escape(name) for name, _ in quality.names.most_common())
    thresholds = ", ".join(escape(value) for value, _ in quality.thresholds.most_common())
    first = (_chart("Judge score of the first answers", quality.first_scores, "points")
             if quality.recaptioned else "")
    no_score = (f" {quality.no_score:,} have no score that is a number." if quality.no_score
                else "")
    lowest = quality.lowest_first()
    return (f"<h3>Judge</h3><p>{quality.judged:,} captions judged ({names}); threshold "
            f"{thresholds or 'none'}: {quality.recaptioned:,} re-captioned, {quality.below:,} "
            f"kept under their threshold.{no_score}</p>"
            '<div class="charts">' + _chart("Judge score of the kept answers", quality.scores,
                                             "points") + first + "</div>"
            f"<h3>Lowest scores</h3><p>The {len(lowest):,} lowest-scoring judged records, "
            f'lowest first.</p><div class="sheet">{_cards_html(stats, lowest)}</div>')


def _page(output_dir: str, stats: _Stats) -> str:
    """The whole page."""
    options = stats.job.options
    title = escape(f"Caption report: {output_dir}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{title}</title><style>{STYLE}</style></head><body><h1>{title}</h1>"
            f"<p>model <b>{escape(_cut(str(options.get('model')), MAX_LABEL_CHARS))}</b> at "
            f"{escape(_cut(str(options.get('api_url')), MAX_KEY_CHARS))}</p>"
            + _counts_html(stats.job.summary) + _failures_html(stats) + _quality_html(stats)
            + _charts_html(stats)
            + _unread_html(stats.unread) + _sheet_html(stats) + "</body></html>\n")


def write_report(output_dir: str, sample: int = 24, seed: int = 0) -> str:
    """Write OUTDIR/report.html for the caption job whose --output is ``output_dir`` (local,
    gs:// or s3://), with ``sample`` records on its contact sheet chosen by ``seed``; returns
    the path written."""
    stats = _Stats(sample, random.Random(seed), _Job.of(_read_summary(output_dir)))
    for line in read_output_records(output_dir, CAPTIONS_PREFIX, stats.unread):
        stats.add_caption(line)
    for line in read_output_records(output_dir, FAILURES_PREFIX, stats.unread):
        stats.add_failure(line)
    path = f"{output_dir.rstrip('/')}/{REPORT_FILE}"
    with fsspec.open(path, "wt", encoding="utf-8") as handle:
        handle.write(_page(output_dir, stats))
    return path


def main(argv: list[str]) -> int:
    """The ``report`` subcommand; prints ``report: PATH``."""
    parser = argparse.ArgumentParser(
        prog="python -m beam_caption report",
        description="Write OUTDIR/report.html: a self-contained page with a caption job's "
                    "counts, failures, latency and token histograms, captions over time and "
                    "a contact sheet of sampled captions with thumbnails.")
    parser.add_argument("output", metavar="OUTDIR", help="the job's --output (local, gs://, s3://)")
    parser.add_argument("--sample", type=int, default=24,
                        help="captioned records on the contact sheet (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    args = parser.parse_args(argv)
    if args.sample < 0:
        raise UsageError("--sample must be >= 0")
    print(f"report: {write_report(args.output, args.sample, args.seed)}")
    return 0
