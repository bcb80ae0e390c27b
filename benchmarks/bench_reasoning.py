"""Reasoning models: what --reasoning_effort costs in tokens and latency, on the bundled fake
reasoning model (issue 14).

The fake reasoning model (``fake_vlm --reasoning``) thinks 0 / 64 / 192 / 768 tokens at effort
minimal / low / medium (its default) / high before it answers, 0.5 ms per reasoning token on
top of a 20 ms base latency; reasoning tokens count against the completion limit, as OpenAI's
do. The real captioning stage (``common.Stage``) sends every record once per effort
(``--max_tokens 1000``, C=16); a second part shows a limit spent on reasoning: ``--max_tokens
100`` at the default effort, then at ``minimal``.

    python benchmarks/bench_reasoning.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
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
    stage_config,
    temp_dir,
    write_small_images,
)

EFFORTS = ("minimal", "low", "medium", "high")
CONCURRENCY = 16


def pass_with(vlm: FakeVLM, images: list[str], root: str, records: int, run: str,
              *flags: str) -> tuple[list[dict], int, int]:
    """One bundle through the real DoFn: (captions, failures, requests the server saw)."""
    vlm.reset_stats()
    stage = Stage(stage_config(vlm.url, CONCURRENCY, root, *flags))
    result = stage.run(elements(images, records, run))
    return result.outputs, result.failed, vlm.stats()["requests"]


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    records = 40 if args.quick else 200
    table = Table("Reasoning effort on the fake reasoning model (--max_tokens 1000, C=16)")
    with temp_dir("reasoning") as tmp, FakeVLM(["--reasoning", "--latency_ms", "20"]) as vlm:
        images = write_small_images(Path(tmp) / "images", 20)
        by_effort = {}
        for effort in EFFORTS:
            captions, failed, requests = pass_with(vlm, images, tmp, records, effort,
                                                   "--max_tokens", "1000",
                                                   "--reasoning_effort", effort)
            if failed or len(captions) != records or requests != records:
                raise RuntimeError(f"{effort}: {failed} failed, {requests} requests")
            metas = [caption["caption_meta"] for caption in captions]
            by_effort[effort] = (statistics.mean(m["completion_tokens"] for m in metas),
                                 statistics.mean(m["reasoning_tokens"] for m in metas),
                                 statistics.median(m["latency_ms"] for m in metas))
            print(f"  {effort}: {by_effort[effort]}", flush=True)
        minimal_tokens, _, minimal_ms = by_effort["minimal"]
        for effort, (tokens, reasoning, latency) in by_effort.items():
            table.rows += [
                Row(f"{effort}: completion tokens per record ({reasoning:.0f} reasoning)",
                    Spread([tokens]), "", ideal=minimal_tokens),
                Row(f"{effort}: median request latency", Spread([latency]), "ms",
                    ideal=minimal_ms),
            ]
        spent, spent_failed, spent_requests = pass_with(vlm, images, tmp, records, "spent",
                                                        "--max_tokens", "100")
        fits, fits_failed, _ = pass_with(vlm, images, tmp, records, "fits", "--max_tokens", "100",
                                         "--reasoning_effort", "minimal")
        table.rows += [
            Row("--max_tokens 100, default effort: requests per record (all response/length)",
                Spread([spent_requests / records]), "", ideal=1, target=1,
                higher_is_better=False),
            Row("--max_tokens 100, --reasoning_effort minimal: records captioned",
                Spread([len(fits)]), "", ideal=records, target=records),
        ]
        if len(spent) or spent_failed != records or fits_failed:
            raise RuntimeError(f"spent: {len(spent)} captioned, {spent_failed} failed; "
                               f"minimal: {fits_failed} failed")
    table.notes.append(load_note())
    table.print()


if __name__ == "__main__":
    main()
