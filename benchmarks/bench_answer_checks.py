"""Answer checks (issue 25): their CPU per answer against the captioning stage's CPU per record,
and what a server whose first answers loop 5% of the time costs in requests.

Part 1 times ``AnswerChecks().check`` (every check on, as by default) on captions of four
lengths, one core, many rounds; the stage's CPU per record is the client process's CPU
(``/proc``) over a bundle of the real DoFn (``common.Stage``, C=16, 20 ms latency, small
images) with ``--answer_checks none``, divided by its records: the checks' share of it must
stay under 5%. Part 2 runs the stage against ``fake_vlm --rate_loop 0.05`` (5% of request
contents loop on their first answer, ``--max_backoff 0.05``): each loop must cost exactly one
more request, every record must end captioned, and no caption may hold a loop.

    python benchmarks/bench_answer_checks.py [--quick]
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FakeVLM,
    Row,
    Spread,
    Stage,
    Table,
    elements,
    load_note,
    parse_args,
    process_cpu_seconds,
    stage_config,
    temp_dir,
    write_small_images,
)

from beam_caption.core.answer_checks import AnswerChecks
from beam_caption.core.errors import CaptionError
from beam_caption.testing.fake_vlm import LOOP_PHRASE

CONCURRENCY = 16
VOCABULARY_TEXT = (
    "a the brown dog cat child woman man runs sits stands across beside behind under over "
    "green red blue yellow white black field street bench tree trees path bridge river sky "
    "clouds light afternoon morning evening grass flowers window door car bicycle table chair "
    "cup book phone lamp wall floor roof house building shop sign road sidewalk park pond "
    "ducks bird birds small large tall old young wooden metal glass stone bright dark warm "
    "soft shadow reflection background foreground left right center corner near far holding "
    "wearing looking walking reading smiling jacket shirt hat bag umbrella basket ball kite "
    "mountain hill beach sand waves boat sea snow rain fog sunset sunrise with and of in on"
)
VOCABULARY = VOCABULARY_TEXT.split()
LENGTHS = (60, 300, 1_000, 4_000)  # characters: a short caption to a very detailed one
TARGET_SHARE = 0.05


def caption_of(chars: int, seed: int = 0) -> str:
    """An ordinary caption of about ``chars`` characters: sentences of 8 to 16 words drawn
    from VOCABULARY (a seeded draw: the same text every run)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while sum(map(len, sentences)) < chars:
        words = rng.choices(VOCABULARY, k=rng.randint(8, 16))
        sentences.append(" ".join(words).capitalize() + ". ")
    return "".join(sentences)[:chars]


def check_cpu_us(text: str, rounds: int) -> Spread:
    """CPU microseconds of one ``check`` of ``text`` (a refused answer's CaptionError
    included): the median of 5 timings of ``rounds``."""
    check = AnswerChecks().check
    timings = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            with contextlib.suppress(CaptionError):
                check(text)
        timings.append((time.process_time() - started) / rounds * 1e6)
    return Spread(timings)


def stage_cpu_ms(vlm: FakeVLM, images: list[str], root: str, records: int,
                 repeats: int) -> Spread:
    """The client's CPU milliseconds per record over a bundle of the stage, checks off."""
    stage = Stage(stage_config(vlm.url, CONCURRENCY, root, "--answer_checks", "none"))
    stage.run(elements(images, CONCURRENCY * 4, "warm-up"))
    per_record = []
    for repeat in range(repeats):
        before = process_cpu_seconds(os.getpid())
        result = stage.run(elements(images, records, f"cpu{repeat}"))
        spent = process_cpu_seconds(os.getpid()) - before
        if result.failed or result.captioned != records:
            raise RuntimeError(f"{result.failed} failed")
        per_record.append(spent / records * 1000)
        print(f"  stage pass {repeat}: {per_record[-1]:.2f} ms CPU per record", flush=True)
    return Spread(per_record)


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    records = 200 if args.quick else 1_000
    repeats = 1 if args.quick else 3
    table = Table("Answer checks: CPU per answer, and requests spent on a server that loops")
    with temp_dir("answer_checks") as tmp:
        images = write_small_images(Path(tmp) / "images", 20)
        with FakeVLM(["--latency_ms", "20"]) as vlm:
            per_record = stage_cpu_ms(vlm, images, tmp, records, repeats)
        table.rows.append(Row("captioning stage, checks off: client CPU per record",
                              per_record, "ms"))
        budget_us = per_record.median * 1000 * TARGET_SHARE
        for chars in LENGTHS:
            caption = caption_of(chars)
            AnswerChecks().check(caption)  # an ordinary caption: it passes
            cost = check_cpu_us(caption, 200 if args.quick else 2_000)
            table.rows.append(Row(f"checks of a {chars:,}-character caption: CPU per answer "
                                  "(ideal: 0; ratio: share of the stage's CPU per record)",
                                  cost, "us", ideal=per_record.median * 1000,
                                  target=budget_us, higher_is_better=False))
        loop = caption_of(60) + LOOP_PHRASE * 180
        table.rows.append(Row("checks of a 2,000-character loop (found: response/degenerate)",
                              check_cpu_us(loop, 200 if args.quick else 2_000), "us"))
        with FakeVLM(["--latency_ms", "20", "--rate_loop", "0.05"]) as vlm:
            stage = Stage(stage_config(vlm.url, CONCURRENCY, tmp, "--max_backoff", "0.05"))
            result = stage.run(elements(images, records, "loops"))
            stats = vlm.stats()
    loops = stats["faults"].get("loop", 0)
    kept = sum(LOOP_PHRASE * 2 in caption["caption"] for caption in result.outputs)
    extra = stats["requests"] / records - 1
    table.rows += [
        Row("5% of first answers loop: first answers that looped (content-derived draw)",
            Spread([loops / records]), "per record", ideal=0.05),
        Row("same: extra requests per record (ideal: the loops served)",
            Spread([extra]), "", ideal=loops / records if loops else None,
            target=loops / records, higher_is_better=False),
        Row("same: records captioned", Spread([result.captioned]), "", ideal=records,
            target=records),
        Row("same: captions holding a loop", Spread([kept]), "", target=0,
            higher_is_better=False),
    ]
    table.notes.append(load_note())
    table.print()


if __name__ == "__main__":
    main()
