"""How much the monitor costs the machine it watches.

1. Sampling the process table with ~N processes alive (sleepers are started to reach N): the
   /proc reader xltop uses on Linux against plain psutil, median ms per sample, side by side.
2. The monitor's own CPU use, headless at a 1 s interval over S seconds (no run, so only the
   monitor is measured): CPU seconds the `xltop` process burns in its steady state, as a
   percent of one core, read from its own counters between the end of start-up and the end.

    .venv/bin/python benchmarks/bench_monitor.py [--procs 500] [--seconds 60]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from xltop.sources import SystemSource, _ProcfsReader, _PsutilReader


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_process_table(target: int, repeats: int) -> None:
    sleepers = []
    try:
        while len(psutil.pids()) < target:
            sleepers.append(subprocess.Popen(["sleep", "600"]))
        n = len(psutil.pids())
        source = SystemSource(top_n=30)
        psutil_reader = _PsutilReader()
        psutil_reader.read()  # keep its Process objects warm, as SystemSource would
        procfs = median_ms(_ProcfsReader().read, repeats)
        plain = median_ms(psutil_reader.read, repeats)
        full = median_ms(source.sample, repeats)
        print(f"process table, {n} processes, median of {repeats}:")
        print(f"  /proc reader (xltop) {procfs:7.2f} ms  ({procfs / n * 1e3:5.1f} us/process)")
        print(f"  psutil per process   {plain:7.2f} ms  ({plain / n * 1e3:5.1f} us/process)")
        print(f"  ratio psutil / xltop {plain / procfs:7.1f} x")
        print(f"  whole SystemSource.sample() (top 30 described): {full:.2f} ms")
        print(f"  = {full / 10:.2f}% of one core at a 1 s interval")
    finally:
        for proc in sleepers:
            proc.kill()
        for proc in sleepers:
            proc.wait()


def bench_headless_cpu(
    seconds: float,
    warmup: float = 5.0,
    watch: tuple[str, ...] = ("--no-run",),
    target: str = "< 1%",
) -> None:
    """`xltop --headless` watching `watch` (the machine alone: --no-run; a cluster: --ray URL)."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "bench.csv"
        total = str(seconds + warmup + 2)
        cmd = [sys.executable, "-m", "xltop", "--headless", "--quiet", *watch,
               "--csv", str(log), "--interval", "1", "--duration", total]  # fmt: skip
        proc = subprocess.Popen(cmd)
        try:
            monitor = psutil.Process(proc.pid)
            time.sleep(warmup)  # start-up (imports) is not the steady state
            t0, c0 = time.monotonic(), sum(monitor.cpu_times()[:2])
            time.sleep(seconds)
            t1, c1 = time.monotonic(), sum(monitor.cpu_times()[:2])
        finally:
            proc.terminate()
            proc.wait()
        rows = log.read_text().count("\n") - 1
    share = (c1 - c0) / (t1 - t0) * 100
    print(f"headless monitor {' '.join(watch)}, 1 s interval, {t1 - t0:.0f} s steady state "
          f"({rows} CSV rows):")  # fmt: skip
    print(f"  CPU {c1 - c0:.3f} s = {share:.2f}% of one core (target {target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total >> 30} GiB")
    bench_process_table(args.procs, args.repeats)
    bench_headless_cpu(args.seconds)


if __name__ == "__main__":
    main()
