"""Job-wide rate limits: two worker processes against an account that enforces its limit with
real 429s (issue 10).

The fake server (its own process) runs an account of 600 requests per minute whose bucket
holds 2 s of it (20 requests), refilled at 10 per second, and refuses what exceeds it with a
429 (Retry-After 0.5 s), as OpenAI does. The CLI runs 200 records on two worker processes
(``multi_processing``, ``--max_concurrency 8`` each, 20 ms per answer), which unpaced would ask
for ~40x the account's rate. The fastest any client can finish is (200 - 20) / 10 = 18 s of
requests. Each row is one whole process; the 429 share is of all requests the server saw. The
ideal wall time is the limit's minimum plus the wall time of the same run without any limit
(start-up, reading, writing: ~5 s for two worker processes).

- unpaced: no headers, no limit flag (retries alone; the behaviour before issue 10)
- headers: the account's ``x-ratelimit-*`` headers alone pace each process
- flag: no headers, ``--max_requests_per_minute 600`` split over the 2 processes
- tokens: an account of 60,000 tokens per minute (2 s bucket) with headers and no requests
  limit; the account charges a request its prompt tokens plus ``max_tokens`` (64); the
  limit's minimum is (tokens charged - the bucket) / 1,000 per s; ``--quick`` skips it

    python benchmarks/bench_rate_limit.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FakeVLM,
    Row,
    Spread,
    Table,
    load_note,
    parse_args,
    run_cli,
    temp_dir,
    write_manifest,
    write_small_images,
)

RPM = 600
BURST_S = 2.0
MAX_TOKENS = 64
FLEET = ("--direct_running_mode", "multi_processing", "--direct_num_workers", "2",
         "--max_retries", "30", "--max_tokens", str(MAX_TOKENS))



def run_case(tmp: Path, name: str, manifests: str, images: Path, server_args: list[str],
             *flags: str) -> tuple[float, float, dict]:
    """One CLI run: (wall seconds, 429 share of requests, summary.json)."""
    with FakeVLM(["--latency_ms", "20", "--retry_after", "0.5", "--account_burst_s",
                  str(BURST_S), *server_args]) as vlm:
        run = run_cli(manifests, tmp / name, vlm.url, 8, images, *FLEET, *flags)  # type: ignore[arg-type]
        stats = vlm.stats()
    refused = stats["by_status"].get("429", 0)
    print(f"  {name}: {run.wall_s:.1f} s, {refused} of {stats['requests']} refused, "
          f"throttled_s {run.summary.get('throttled_s')}", flush=True)
    return run.wall_s, refused / stats["requests"], run.summary


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    records = 100 if args.quick else 200
    table = Table(f"Job-wide limits: 2 worker processes, account {RPM} requests/min "
                  f"({BURST_S:.0f} s bucket), {records} records")
    with temp_dir("ratelimit") as tmp_name:
        tmp = Path(tmp_name)
        images = write_small_images(tmp / "images", 20)
        half = records // 2
        manifests = ",".join(str(write_manifest(tmp / f"part{i}.jsonl", images, half,
                                                      first=i * half))
                             for i in range(2))
        started, _, _ = run_case(tmp, "no limit", manifests, tmp / "images", [])
        minimum = (records - RPM / 60 * BURST_S) / (RPM / 60) + started
        account = ["--account_rpm", str(RPM)]
        cases = [("unpaced", [*account, "--no_account_headers"], ()),
                 ("headers", account, ()),
                 ("flag", [*account, "--no_account_headers"],
                  ("--max_requests_per_minute", str(RPM)))]
        for name, server_args, flags in cases:
            wall, share, summary = run_case(tmp, name, manifests, tmp / "images",
                                            server_args, *flags)
            if summary["captioned"] != records:
                raise RuntimeError(f"{name}: {summary['captioned']} of {records} captioned")
            target = None if name == "unpaced" else 0.05
            table.rows += [
                Row(f"{name}: 429 share of requests", Spread([share]), "", ideal=None,
                    target=target, higher_is_better=False),
                Row(f"{name}: process wall (ideal: the limit's minimum + the unlimited run)",
                    Spread([wall]), "s", ideal=minimum),
            ]
        if not args.quick:
            tpm = 60_000
            wall, share, summary = run_case(tmp, "tokens", manifests, tmp / "images",
                                            ["--account_tpm", str(tpm)])
            if summary["captioned"] != records:
                raise RuntimeError(f"tokens: {summary['captioned']} of {records} captioned")
            charged = summary["tokens"]["prompt"] + records * MAX_TOKENS  # as the account counts
            minimum = (charged - tpm / 60 * BURST_S) / (tpm / 60) + started
            table.rows += [
                Row(f"tokens ({tpm:,}/min account, headers): 429 share", Spread([share]), "",
                    target=0.05, higher_is_better=False),
                Row("tokens: process wall (ideal: the limit's minimum + the unlimited run)",
                    Spread([wall]), "s", ideal=minimum),
            ]
    table.notes.append(load_note())
    table.print()


if __name__ == "__main__":
    main()
