"""Optional profiling with py-spy (not a dependency of the package: ``pip install py-spy``).

``with PySpy({"client": os.getpid(), "server": pid}, out_dir) as spy:`` samples those processes
(GIL-holding stacks only, without pausing them) into ``out_dir/NAME.raw``; ``spy.report()``
then says, per process, how busy each thread kept the GIL and which functions it was in.
``python benchmarks/pyspy.py FILE.raw [SECONDS]`` summarises a raw file recorded by hand.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RATE_HZ = 100
TOP = 12
NO_FRAME = "(no Python frame)"


def py_spy_binary() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


class PySpy:
    """``py-spy record`` attached to running processes for the duration of a block."""

    def __init__(self, pids: dict[str, int], out_dir: Path):
        self._pids = pids
        self._out_dir = out_dir

    def __enter__(self) -> PySpy:
        self._out_dir.mkdir(parents=True, exist_ok=True)
        binary = py_spy_binary()
        self._spies = {
            name: subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--gil", "--threads", "--nonblocking",
                 "--nolineno", "--rate", str(RATE_HZ), "--format", "raw",
                 "--output", str(self.path(name))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in self._pids.items()}
        time.sleep(0.5)  # let py-spy attach before the measured work starts
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._started
        for spy in self._spies.values():
            spy.send_signal(signal.SIGINT)
        for spy in self._spies.values():
            spy.wait(30)

    def path(self, name: str) -> Path:
        return self._out_dir / f"{name}.raw"

    def report(self) -> list[str]:
        lines = []
        for name in self._pids:
            lines.append(f"{name} ({self.path(name)}):")
            lines.extend("  " + line for line in summarize(self.path(name), self.seconds))
        return lines


def summarize(raw_file: Path, seconds: float | None = None, top: int = TOP) -> list[str]:
    """Threads by GIL samples, then the top functions by self and by inclusive samples.

    With ``seconds`` (the sampled wall time) sample counts become fractions of one core.
    """
    threads: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        count = int(count_text)
        total += count
        threads[frames[0].partition(": ")[2] or frames[0]] += count
        calls = frames[1:] or [NO_FRAME]
        packages[_package(calls)] += count
        own[calls[-1]] += count
        for function in set(calls):
            inclusive[function] += count
    if not total:
        return ["no samples"]

    def share(count: int) -> str:
        if seconds:
            return f"{count / RATE_HZ / seconds:5.2f} core"
        return f"{100 * count / total:5.1f}%"

    busy = f" = {total / RATE_HZ / seconds:.2f} cores holding the GIL" if seconds else ""
    lines = [f"{total} samples{busy}; by thread (pool threads summed):"]
    pools: collections.Counter[str] = collections.Counter()
    for thread, count in threads.items():
        pools[thread.rstrip("0123456789").rstrip("_") or thread] += count
    lines += [f"  {share(count)}  {thread}" for thread, count in pools.most_common(6)]
    lines.append("by package (standard library time charged to its nearest caller outside it):")
    lines += [f"  {share(count)}  {package}" for package, count in packages.most_common(8)]
    lines.append("top functions by own samples:")
    lines += [f"  {share(count)}  {function}" for function, count in own.most_common(top)]
    lines.append("top functions by inclusive samples (callers included):")
    skip = ("Thread.", "BaseEventLoop.", "Handle._run", "_bootstrap", "_run_module_as_main",
            "_run_code", "<module>", "main (")
    ranked = [(f, c) for f, c in inclusive.most_common() if not f.startswith(skip)]
    lines += [f"  {share(count)}  {function}" for function, count in ranked[:top]]
    return lines


def _package(calls: list[str]) -> str:
    """The package of the innermost frame outside the standard library ("stdlib" if none)."""
    if calls == [NO_FRAME]:
        return NO_FRAME
    for frame in reversed(calls):
        path = frame.rpartition(" (")[2].rstrip(")")
        top = path.split("/")[0].removesuffix(".py")
        if top not in sys.stdlib_module_names and not top.startswith("<"):
            return top
    return "stdlib only (event loop, threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarise a py-spy raw profile "
                                                 "(py-spy record -f raw --nolineno -t).")
    parser.add_argument("raw_file", type=Path)
    parser.add_argument("seconds", type=float, nargs="?",
                        help="sampled wall time, to express samples as cores (at 100 Hz)")
    args = parser.parse_args()
    print("\n".join(summarize(args.raw_file, args.seconds)))


if __name__ == "__main__":
    main()
