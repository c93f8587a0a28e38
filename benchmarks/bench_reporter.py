"""What a Reporter (ttt_runtime.report) costs a user's MLX loop at one `step()` a step, with a
monitor attached and reading every report.

Two figures. `step()` alone: the mean CPU time of a call on the calling thread, over many calls
with nothing between them (the cost a loop of any size pays), and how much the process's memory
grew over that flood. And a real training loop (an MLP
learning by SGD on random data) timed with and without the reporter, side by side: rounds
alternate off/on so that load from other processes falls on both alike; each round's figures are
its wall and process CPU time a step, and the extra shown is the median over the pairs of rounds.
That extra is the calls plus what the service thread (replies, building and sending reports)
takes from the loop. The monitor is another process, as xltop is.

    .venv/bin/python benchmarks/bench_reporter.py [--rounds 9] [--steps 40] [--width 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import psutil

from ttt_runtime.report import Reporter

BUDGET = 0.01  # the reporter may cost at most 1% of a loop's step


def make_loop(width: int):
    """One SGD step of a 3-layer MLP on a fixed random batch, evaluated."""
    model = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
    optimizer = optim.SGD(learning_rate=1e-3)
    x, y = mx.random.normal((64, width)), mx.random.normal((64, width))
    loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))

    def step() -> mx.array:
        loss, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters())
        return loss

    return step


# The monitor: another process, as xltop is, reading every report until its stdin closes; it
# prints the last step it read.
MONITOR = """
import sys
from ttt_runtime.channel import ChannelClient
client = ChannelClient.connect(sys.argv[1])
sys.stdin.read()
print(client.latest().step if client.latest() else -1)
"""


def round_times(step, steps: int, reporter: Reporter | None) -> tuple[float, float]:
    """(wall, this process's CPU) seconds per step over `steps` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
        if reporter is not None:
            reporter.step(loss=loss, tokens=64, lr=1e-3)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=40, help="loop steps per round")
    parser.add_argument("--width", type=int, default=128, help="the MLP's width")
    parser.add_argument("--calls", type=int, default=20_000, help="step() calls timed alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        reporter = Reporter(socket=os.path.join(folder, "r.sock"), name="bench")
        monitor = subprocess.Popen(
            [sys.executable, "-c", MONITOR, reporter.socket],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            while not reporter._server.monitors:  # connected (importing takes a moment)
                time.sleep(0.05)
            rss = psutil.Process().memory_info().rss
            start = time.thread_time()  # this thread's CPU time: other processes' load left out
            for _ in range(args.calls):
                reporter.step(loss=1.0, tokens=64, lr=1e-3)
            call_s = (time.thread_time() - start) / args.calls
            grown = psutil.Process().memory_info().rss - rss
            step = make_loop(args.width)
            round_times(step, 20, None)  # warm-up: compile and allocate
            pairs = [
                (round_times(step, args.steps, None), round_times(step, args.steps, reporter))
                for _ in range(args.rounds)
            ]
        finally:
            last_read = int(monitor.communicate(timeout=60)[0] or -1)
            reporter.close()
    assert last_read > args.calls, "the monitor read no report of the loop"
    off = statistics.median(off[0] for off, _ in pairs)
    wall = statistics.median(on[0] / off[0] - 1 for off, on in pairs)
    cpu = statistics.median(on[1] / off[1] - 1 for off, on in pairs)
    print(f"reporter.step() alone: {call_s * 1e6:.1f} us of CPU a call"
          f" ({args.calls} calls back to back, a monitor process reading; the process's RSS"
          f" grew {grown / 2**20:.1f} MiB over them)")  # fmt: skip
    print(f"loop (MLP width {args.width}, batch 64, SGD): {off * 1e3:.2f} ms a step; with the"
          f" reporter, median over {args.rounds} paired rounds of {args.steps} steps:"
          f" wall {wall:+.2%}, process CPU {cpu:+.2%} (others' load included)")  # fmt: skip
    verdict = "within" if call_s <= BUDGET * off else "OVER"
    print(f"step() is {call_s / off:.3%} of this loop's step: {verdict} the 1% budget, which"
          f" steps shorter than {call_s / BUDGET * 1e3:.2f} ms would exceed")  # fmt: skip


if __name__ == "__main__":
    main()
