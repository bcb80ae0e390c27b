"""Captioning throughput against the fake VLM server in its own process (issue targets 1 and 2).

The captioning stage is measured by itself: the CaptionImages DoFn (``_CaptionRecords``, with
its per-worker ``CaptionRuntime``) is set up once and given one bundle per pass, outside a
pipeline, timed from the first record in to the last result out. Every record is a distinct
request (own prompt), so the worker's request cache never answers for the server; each pass
checks that the server saw exactly one request per record and that nothing failed. CPU use of
the client (by thread) and of the server says which process saturates. The whole pipeline's images/s
(``python -m beam_caption``, summary.json) is reported beside target 1.

    python benchmarks/bench_throughput.py [--quick] [--profile DIR]

``--profile DIR`` (needs py-spy) also samples the client and the server during one extra pass
of each scenario and prints each process's busiest threads and top functions.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CpuMeter,
    FakeVLM,
    Row,
    Spread,
    Stage,
    Table,
    elements,
    load_note,
    parse_args,
    run_cli,
    stage_config,
    temp_dir,
    write_manifest,
    write_small_images,
)
from pyspy import PySpy


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    latency_ms: int
    records: int
    target_fraction: float  # of the ideal concurrency / latency

    @property
    def ideal(self) -> float:
        return self.concurrency / (self.latency_ms / 1000)


def measure_stage(scenario: Scenario, image_paths: list[str], image_root: str, repeats: int,
                  profile_dir: Path | None, table: Table) -> None:
    """Repeated passes of the captioning stage; adds the figure and the CPU evidence to table."""
    rates, client_cpu, server_cpu = [], [], []
    with FakeVLM(["--latency_ms", str(scenario.latency_ms)]) as vlm:
        stage = Stage(stage_config(vlm.url, scenario.concurrency, image_root))
        stage.run(elements(image_paths, 4 * scenario.concurrency, "warm-up"))
        for rep in range(repeats):
            vlm.reset_stats()
            items = elements(image_paths, scenario.records, f"pass{rep}")
            with CpuMeter({"client": os.getpid(), "server": vlm.pid}) as cpu:
                run = stage.run(items)
            _check(run, vlm.stats(), scenario)
            rates.append(run.per_s)
            client_cpu.append(cpu.processes["client"])
            server_cpu.append(cpu.processes["server"])
            print(f"  {scenario.name} pass {rep + 1}: {run.per_s:.1f} images/s; cores busy: "
                  f"client {cpu.processes['client']:.2f} ({cpu.busiest_threads()}), "
                  f"server {cpu.processes['server']:.2f}", flush=True)
        if profile_dir is not None:
            items = elements(image_paths, scenario.records, "profiled")
            with PySpy({"client": os.getpid(), "server": vlm.pid},
                       profile_dir / f"c{scenario.concurrency}") as spy:
                run = stage.run(items)
            print(f"  profiled pass ({run.per_s:.1f} images/s under py-spy):")
            print("\n".join("    " + line for line in spy.report()), flush=True)
    rate = Spread(rates)
    table.rows.append(Row(f"{scenario.name}: captioning stage", rate, "images/s",
                          ideal=scenario.ideal, target=scenario.target_fraction * scenario.ideal))
    per_request_ms = [1000 * cpu / r for cpu, r in zip(client_cpu, rates, strict=True)]
    table.notes.append(
        f"{scenario.name}: client process {Spread(client_cpu)} cores busy "
        f"({Spread(per_request_ms)} ms CPU per image), server {Spread(server_cpu)} cores")


def _check(run, stats: dict, scenario: Scenario) -> None:
    if run.failed or stats["requests"] != scenario.records:
        raise RuntimeError(f"{scenario.name}: {run.failed} failed, {stats['requests']} requests "
                           f"for {scenario.records} records: the figure would be wrong")


def measure_pipeline(scenario: Scenario, image_paths: list[str], root: Path, repeats: int,
                     table: Table) -> None:
    """images_per_s from summary.json of whole ``python -m beam_caption`` runs."""
    manifest = write_manifest(root / "pipeline.jsonl", image_paths, scenario.records)
    rates = []
    with FakeVLM(["--latency_ms", str(scenario.latency_ms)]) as vlm:
        for rep in range(repeats):
            run = run_cli(manifest, root / f"out{rep}", vlm.url, scenario.concurrency, root)
            rates.append(run.summary["images_per_s"])
            print(f"  whole pipeline run {rep + 1}: {rates[-1]:.1f} images/s "
                  f"(summary wall {run.summary['wall_time_s']:.1f} s)", flush=True)
    table.rows.append(Row(f"{scenario.name}: whole pipeline (summary images_per_s)",
                          Spread(rates), "images/s", ideal=scenario.ideal))


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], profile=True)
    repeats = 1 if args.quick else 3
    scale = 4 if args.quick else 1
    scenarios = [Scenario("C=10, 100 ms", 10, 100, 2000 // scale, 0.95),
                 Scenario("C=64, 100 ms", 64, 100, 5000 // scale, 0.85)]
    table = Table("Captioning throughput (fake VLM server in its own process)")
    with temp_dir("throughput") as tmp:
        root = Path(tmp)
        image_paths = write_small_images(root / "images", 2000 // scale)
        for scenario in scenarios:
            print(f"{scenario.name}, {scenario.records} records:", flush=True)
            measure_stage(scenario, image_paths, str(root), repeats, args.profile, table)
        measure_pipeline(scenarios[0], image_paths, root, repeats, table)
    table.notes.append(f"small images: {len(image_paths)} distinct 64-160 px JPEGs; every "
                       "record its own prompt (no request-cache hits)")
    table.notes.append(load_note())
    table.print()


if __name__ == "__main__":
    main()
