"""What clients flooding a run's channel cost its training.

A real run (`python -m ttt_runtime run`, tiny preset by default) trains while 0, 1 or 2 raw
clients each send one kind of line as fast as the run takes it and read every reply: `resume`
(a command the run loop obeys; the issue's case, which once stopped the steps for 20 s and grew
the run from 54 to 120 MB), a line that is not JSON, or `hello` (both answered by the channel
itself). Steps/s comes from the run's own telemetry over windows of S seconds, the conditions
taking turns, W windows each; printed as medians side by side with the replies/s the flooders
got and the run's RSS at the end of the last window.

    .venv/bin/python benchmarks/bench_flood.py [--preset tiny] [--windows 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import statistics
import threading
import time

import psutil

from ttt_runtime.channel import ChannelClient, ChannelError
from ttt_runtime.launch import spawn_run

FLOODS = {
    "resume": b'{"cmd":"resume","id":1}\n',
    "not JSON": b"nonsense\n",
    "hello": b'{"cmd":"hello","id":1}\n',
}
CONDITIONS = [("no flood", None, 0)] + [
    (f"{n} x {kind}", kind, n) for kind in FLOODS for n in (1, 2)
]


class Flooder:
    """A raw client that sends one line over and over and reads (counts) the replies."""

    def __init__(self, path: str, line: bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.replies = 0
        self._batch = line * 1000
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._read)]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        self.sock.close()

    def _send(self) -> None:
        with contextlib.suppress(OSError):  # until close() shuts the socket
            while True:
                self.sock.sendall(self._batch)

    def _read(self) -> None:
        rest = b""
        with contextlib.suppress(OSError):
            while data := self.sock.recv(1 << 16):
                *lines, rest = (rest + data).split(b"\n")
                self.replies += sum(b'"type":"reply"' in line for line in lines)


def connect(path: str, timeout: float = 120.0) -> ChannelClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ChannelClient.connect(path)
        except ChannelError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def latest(watcher: ChannelClient) -> tuple[float, int]:
    report = watcher.latest()
    assert report is not None  # main waited for reports
    return report.t, report.step


def window(watcher: ChannelClient, run: psutil.Process, kind: str | None, count: int,
           seconds: float) -> tuple[float, float, float]:  # fmt: skip
    """(steps/s, the run's CPU ms per step, replies/s to the flooders) over one window with
    `count` flooders of `kind`."""
    path = watcher.path
    flooders = [Flooder(path, FLOODS[kind]) for _ in range(count)] if kind else []
    try:
        time.sleep(0.5)  # the flood reaches its steady state
        (t0, step0), cpu0 = latest(watcher), sum(run.cpu_times()[:2])
        replies0 = sum(f.replies for f in flooders)
        time.sleep(seconds)
        (t1, step1), cpu1 = latest(watcher), sum(run.cpu_times()[:2])
        replies1 = sum(f.replies for f in flooders)
    finally:
        for flooder in flooders:
            flooder.close()
    steps = step1 - step0
    cpu_per_step = (cpu1 - cpu0) * 1e3 / steps if steps else math.inf  # a flood stopped it
    return steps / (t1 - t0), cpu_per_step, (replies1 - replies0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    run = spawn_run(["--preset", args.preset])
    try:
        watcher = connect(run.socket_path)
        while (report := watcher.latest()) is None or report.step < 20:  # past the warm-up
            time.sleep(0.1)
        process = psutil.Process(run.pid)
        results: dict[str, list[tuple[float, float, float]]] = {c[0]: [] for c in CONDITIONS}
        for _ in range(args.windows):  # the conditions take turns: drift hits them all alike
            for name, kind, count in CONDITIONS:
                results[name].append(window(watcher, process, kind, count, args.seconds))
        rss = process.memory_info().rss
        watcher.close()
    finally:
        run.stop()
    print(f"run: preset {args.preset}, {psutil.cpu_count()} cores; {args.windows} windows of "
          f"{args.seconds:g} s per condition, medians")  # fmt: skip
    base = statistics.median(figures[0] for figures in results["no flood"])
    print(f"  {'condition':<14} {'steps/s':>8} {'vs none':>8} {'run CPU ms/step':>16} "
          f"{'replies/s':>10}")  # fmt: skip
    for name, figures in results.items():
        steps, cpu, replies = (statistics.median(column) for column in zip(*figures, strict=True))
        versus = f"{steps / base - 1:+8.1%}" if base else f"{'-':>8}"  # a flood froze even that
        print(f"  {name:<14} {steps:8.1f} {versus} {cpu:16.2f} {replies:10.0f}")
    print(f"  the run's RSS after every flood: {rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
