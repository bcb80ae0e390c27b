"""``python -m beam_caption report OUTDIR``: OUTDIR/report.html, one page to judge a caption job.

The page shows summary.json's counts, the failures by stage and type with one example each,
histograms of latency and tokens, captions over time, and a contact sheet: a seeded sample of
captioned records with a thumbnail of their first image and their answers.

It is self-contained (charts are inline SVG, thumbnails data URLs, no script) and its
Content-Security-Policy forbids scripts and every outside address. Records and answers are
untrusted: all their text is escaped. The output files are streamed: memory holds counters,
bounded histograms and the sample, however many records the job had. Beam is not imported
(outputs.py reads every output format without it), so the command starts at once.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html import escape

import fsspec

from beam_caption.errors import CaptionError, UsageError
from beam_caption.http_images import UrlGuard
from beam_caption.images import (
    DEFAULT_HTTP_TIMEOUT_S,
    ImageSettings,
    prepare_image_bytes,
    read_image_bytes,
    resolve_image_path,
)
from beam_caption.outputs import (
    CAPTIONS_PREFIX,
    FAILURES_PREFIX,
    REPORT_FILE,
    SUMMARY_FILE,
    read_output_records,
)

THUMBNAIL_SETTINGS = ImageSettings(max_side=192, jpeg_quality=80)  # JPEG; PNG if <= 256 colours
THUMBNAIL_THREADS = 8  # images read at once (remote ones wait on the network)
MAX_BINS = 1024  # bins a histogram keeps before doubling their width
MAX_BARS = 40  # bars a chart draws
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
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class _Bins:
    """A histogram of any number of values in at most MAX_BINS bins of equal width: the
    width doubles (neighbouring bins merge) whenever the values spread over more."""

    def __init__(self, width: float) -> None:
        self.width = width
        self.counts: Counter[int] = Counter()

    def add(self, value: object) -> None:
        """Count ``value`` if it is a finite number (meta fields may be null)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if not math.isfinite(value):
            return
        self.counts[math.floor(value / self.width)] += 1
        if len(self.counts) > MAX_BINS:
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


@dataclass
class _Stats:
    """What the page needs from the output lines, gathered one line at a time."""

    sample_size: int
    rng: random.Random
    captions: int = 0
    sample: list[dict] = field(default_factory=list)
    latency_ms: _Bins = field(default_factory=lambda: _Bins(1.0))
    prompt_tokens: _Bins = field(default_factory=lambda: _Bins(1.0))
    completion_tokens: _Bins = field(default_factory=lambda: _Bins(1.0))
    finished_at: _Bins = field(default_factory=lambda: _Bins(0.1))
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    def add_caption(self, line: dict) -> None:
        """Count a captioned record and keep it in the sample with reservoir sampling."""
        self.captions += 1
        meta = line.get("caption_meta") or {}
        self.latency_ms.add(meta.get("latency_ms"))
        self.prompt_tokens.add(meta.get("prompt_tokens"))
        self.completion_tokens.add(meta.get("completion_tokens"))
        self.finished_at.add(meta.get("finished_at"))
        if len(self.sample) < self.sample_size:
            self.sample.append(line)
        else:
            slot = self.rng.randrange(self.captions)
            if slot < self.sample_size:
                self.sample[slot] = line

    def add_failure(self, line: dict) -> None:
        """Count a failure by stage and type, keeping the first of each as the example."""
        error = line.get("error") or {}
        kind = (str(error.get("stage", "?")), str(error.get("type", "?")))
        self.failures[kind] += 1
        self.examples.setdefault(kind, (str(line.get("key", "")), str(error.get("message", ""))))


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

    def thumbnail(self, path: str) -> str:
        """A data URL of the image at ``path`` prepared as the job sends images (upright,
        transparency on white, 16-bit scaled), 192 pixels at most a side."""
        data = read_image_bytes(resolve_image_path(path, self.root), self.max_bytes,
                                self.timeout, self.guard)
        return prepare_image_bytes(data, THUMBNAIL_SETTINGS).data_url

    def html(self, path: str | None) -> str:
        """The thumbnail's <img>, or a box saying why there is none."""
        if path is None:
            return '<div class="noimage">no image path in the record</div>'
        try:
            return f'<img src="{self.thumbnail(path)}" alt="">'
        except Exception as exc:  # any failure on untrusted data costs one thumbnail only
            reason = str(exc) if isinstance(exc, CaptionError) else f"{type(exc).__name__}: {exc}"
            return f'<div class="noimage">{escape(reason)}</div>'


def _read_summary(output_dir: str) -> dict:
    """summary.json of ``output_dir``; UsageError when the directory or the file is missing."""
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
    except ValueError as exc:
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
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6g}"
    return escape(str(value))


def _counts_html(summary: dict) -> str:
    """The table of summary.json's counts."""
    rows = "".join(f"<tr><th>{label}</th><td class=\"n\">{_number(_field(summary, name))}</td>"
                   "</tr>" for label, name in COUNTS)
    return f"<h2>Counts</h2><table>{rows}</table>"


def _failures_html(stats: _Stats) -> str:
    """The failures by stage and type, most frequent first, with one example each."""
    if not stats.failures:
        return "<h2>Failures</h2><p>No failures.</p>"
    rows = "".join(
        f"<tr><td>{escape(stage)}</td><td>{escape(kind)}</td><td class=\"n\">{count:,}</td>"
        f"<td>{escape(stats.examples[stage, kind][0])}</td>"
        f"<td>{escape(stats.examples[stage, kind][1])}</td></tr>"
        for (stage, kind), count in stats.failures.most_common())
    return ("<h2>Failures</h2><table><tr><th>stage</th><th>type</th><th>count</th>"
            f"<th>example key</th><th>example message</th></tr>{rows}</table>")


def _chart(title: str, bins: _Bins, unit: str, origin: float = 0.0) -> str:
    """An SVG bar chart of ``bins``, bar edges shown less ``origin``."""
    bars = bins.bars()
    if not bars:
        return f"<div><h3>{escape(title)}</h3><p>No values.</p></div>"
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
            f'viewBox="0 0 {width} {height + 2 * margin}">{rects}{axis}</svg></div>')


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


def _answer_html(value: object) -> str:
    """A text answer as a paragraph, a structured one (JSON object, list ...) as pretty JSON."""
    if isinstance(value, str):
        return f"<p>{escape(value)}</p>"
    return f"<pre>{escape(json.dumps(value, indent=2, ensure_ascii=False))}</pre>"


def _image_paths(record: dict, image_key: str) -> list[str]:
    """The image paths of a record (its image field holds one path or a list)."""
    value = record.get(image_key)
    paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [path for path in paths if isinstance(path, str)]


def _card_html(record: dict, paths: list[str], thumbnail: str, keys: list[str]) -> str:
    """One record of the contact sheet: its thumbnail, first image path and answers."""
    more = f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""
    place = escape(str((record.get("caption_meta") or {}).get("key", "")))
    answers = "".join(f"<dt>{escape(key)}</dt><dd>{_answer_html(record[key])}</dd>"
                      for key in keys if key in record)
    return (f'<figure>{thumbnail}<figcaption><div class="path" title="{place}">'
            f"{escape(paths[0] if paths else '')}{more}</div><dl>{answers}</dl></figcaption>"
            "</figure>")


def _sheet_html(stats: _Stats, summary: dict) -> str:
    """The contact sheet of the sampled records, their thumbnails read a few at a time."""
    options = summary.get("options") or {}
    keys = summary.get("output_keys") or [options.get("output_key") or "caption"]
    paths = [_image_paths(record, options.get("image_key") or "image")
             for record in stats.sample]
    with ThreadPoolExecutor(THUMBNAIL_THREADS) as pool:
        thumbnails = pool.map(_Images.of(options).html, [p[0] if p else None for p in paths])
        cards = "".join(_card_html(record, record_paths, thumbnail, keys) for record,
                        record_paths, thumbnail in zip(stats.sample, paths, thumbnails,
                                                       strict=True))
    return (f"<h2>Contact sheet</h2><p>{len(stats.sample):,} of {stats.captions:,} captioned "
            f'records, sampled at random.</p><div class="sheet">{cards}</div>')


def _page(output_dir: str, summary: dict, stats: _Stats) -> str:
    """The whole page."""
    options = summary.get("options") or {}
    title = escape(f"Caption report: {output_dir}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{title}</title><style>{STYLE}</style></head><body><h1>{title}</h1>"
            f"<p>model <b>{escape(str(options.get('model')))}</b> at "
            f"{escape(str(options.get('api_url')))}</p>"
            + _counts_html(summary) + _failures_html(stats) + _charts_html(stats)
            + _sheet_html(stats, summary) + "</body></html>\n")


def write_report(output_dir: str, sample: int = 24, seed: int = 0) -> str:
    """Write OUTDIR/report.html for the caption job whose --output is ``output_dir`` (local,
    gs:// or s3://), with ``sample`` records on its contact sheet chosen by ``seed``; returns
    the path written."""
    summary = _read_summary(output_dir)
    stats = _Stats(sample, random.Random(seed))
    for line in read_output_records(output_dir, CAPTIONS_PREFIX):
        stats.add_caption(line)
    for line in read_output_records(output_dir, FAILURES_PREFIX):
        stats.add_failure(line)
    path = f"{output_dir.rstrip('/')}/{REPORT_FILE}"
    with fsspec.open(path, "wt", encoding="utf-8") as handle:
        handle.write(_page(output_dir, summary, stats))
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
