"""Steps/s of the default TTT run with telemetry on (default sampling schedule, one monitor
attached, a report per step) vs off (no sampled steps, no monitor), side by side.

Rounds alternate on/off so that load from other processes falls on both alike. A round's figure
is steps / total time (a mean, so the rarer, slower sampled steps count in full); the figure
shown is the median over rounds. Runs under OpenBLAS when the system has one (re-executes
itself with it preloaded), like a run that xltop spawns.

    .venv/bin/python benchmarks/bench_telemetry.py [--rounds 3] [--steps 60] [--preset default]

With --first-minute it instead spawns the run as xltop does and prints its outer loss
(bits per byte, mean of the reports in each 10 s window) over its first minute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from ttt_runtime.launch import run_environment


def measure(preset: str, telemetry: bool, steps: int, warmup: int) -> list[tuple[float, bool]]:
    """(seconds, sampled) per step after the warm-up."""
    from ttt_runtime.channel import ChannelClient
    from ttt_runtime.config import RunConfig
    from ttt_runtime.run import TTTRun

    config = RunConfig.from_preset(preset)
    if not telemetry:
        config = config.with_overrides(sample_every=0)
    with tempfile.TemporaryDirectory() as folder:
        run = TTTRun(config, socket_path=os.path.join(folder, "run.sock"))
        client = ChannelClient.connect(run.server.path) if telemetry else None
        times = []
        try:
            for i in range(warmup + steps):
                sampled = run.is_sampled(run.step + 1)
                start = time.perf_counter()
                run.run_step()
                run.publish()
                if i >= warmup:
                    times.append((time.perf_counter() - start, sampled))
        finally:
            if client is not None:
                client.close()
            run.close()
    return times


def first_minute(preset: str, seconds: float = 60.0, window: float = 10.0) -> None:
    from ttt_runtime.channel import ChannelClient, ChannelError
    from ttt_runtime.launch import spawn_run

    run = spawn_run(["--preset", preset])
    try:
        while True:
            try:
                client = ChannelClient.connect(run.socket_path, timeout=5.0)
                break
            except ChannelError:
                time.sleep(0.1)
        seen: dict[int, tuple[float, float]] = {}  # step -> (time, loss)
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            message = client.latest()
            if message and message.loss_bpb is not None:
                seen.setdefault(message.step, (time.monotonic() - start, message.loss_bpb))
            time.sleep(0.05)
        client.close()
    finally:
        run.stop()
    print(f"preset {preset}: {max(seen)} steps in {seconds:.0f} s; outer loss (bits/byte):")
    for lo in range(0, int(seconds), int(window)):
        losses = [loss for t, loss in seen.values() if lo <= t < lo + window]
        if losses:
            mean = statistics.mean(losses)
            print(f"  {lo:3d}-{lo + window:<3.0f} s  {mean:.2f}  ({len(losses)} reports)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--first-minute", action="store_true", help="the loss curve instead")
    args = parser.parse_args()
    if args.first_minute:
        first_minute(args.preset)
        return
    if "TTT_BENCH_CHILD" not in os.environ:
        env = dict(run_environment(preload_blas=True), TTT_BENCH_CHILD="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from ttt_runtime.blas import loaded_blas
    from ttt_runtime.config import RunConfig

    rates: dict[bool, list[float]] = {True: [], False: []}
    by_kind: dict[bool, list[float]] = {True: [], False: []}  # telemetry-on steps: sampled?
    for _ in range(args.rounds):
        for telemetry in (True, False):
            times = measure(args.preset, telemetry, args.steps, args.warmup)
            rates[telemetry].append(len(times) / sum(t for t, _ in times))
            if telemetry:
                for t, sampled in times:
                    by_kind[sampled].append(t)
    on, off = (statistics.median(rates[t]) for t in (True, False))
    print(f"preset {args.preset}, BLAS {loaded_blas()}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'':24}{'steps/s (median)':>18}{'ms/step':>10}   rounds")
    for name, t, rate in (("telemetry off", False, off), ("telemetry on (default)", True, on)):
        each = " ".join(f"{r:.2f}" for r in rates[t])
        print(f"{name:24}{rate:18.2f}{1e3 / rate:10.1f}   {each}")
    print(f"overhead: {(off / on - 1) * 100:+.1f}% time per step (target <= 5%)")
    # the same from within the telemetry-on rounds (less exposed to load between rounds)
    fast, slow = (statistics.median(by_kind[k]) for k in (False, True))
    every = RunConfig.from_preset(args.preset).sample_every
    print(
        f"within the on rounds: unsampled {fast * 1e3:.1f} ms, sampled {slow * 1e3:.1f} ms "
        f"(1 in {every}) -> overhead {(slow - fast) / (every * fast) * 100:+.1f}%"
    )


if __name__ == "__main__":
    main()
