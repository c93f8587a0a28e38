"""The one fake of the project: a deterministic Snapshot source for the TUI's snapshot tests.

Every figure is a formula of the tick number, so two runs draw the same screen. It has the
Monitor interface XltopApp uses (tick, interval, runtime, post_event, close); after its last
tick, tick() raises after an interval, so the screen stays still for the screenshot.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ttt_runtime.protocol import BlockTiming, LayerFigures, Reply
from xltop.snapshot import MlxMemory, ProcessInfo, RunInfo, RunState, Snapshot, SystemInfo
from xltop.units import MIB

GIB = 1024 * MIB
START = 1_700_000_000.0  # a fixed clock
RUN_PID = 4242
N_BLOCKS = 8
N_PROCESSES = 30


def fake_processes(k: int) -> tuple[ProcessInfo, ...]:
    processes = [
        ProcessInfo(RUN_PID, "alice", "python3", (900 + 3 * k) * MIB, 97.5,
                    "python3 -m ttt_runtime run --socket /tmp/xltop-x/run.sock", is_run=True),
        ProcessInfo(1000, "alice", "xltop", 120 * MIB, 2.1, "xltop"),
    ]  # fmt: skip
    for i in range(N_PROCESSES - len(processes)):
        processes.append(
            ProcessInfo(2000 + i, "root" if i % 3 else "alice", f"proc{i:02d}",
                        (400 - 12 * i) * MIB, float(i % 7), f"/usr/bin/proc{i:02d} --serve")
        )  # fmt: skip
    return tuple(processes)


def fake_run(k: int, state: RunState = RunState.RUNNING) -> RunInfo:
    blocks = tuple(
        BlockTiming(fwd_ms=2.0 + b + 0.1 * (k % 5), bwd_ms=4.0 + 2 * b) for b in range(N_BLOCKS)
    )  # noqa: E501
    layers = tuple(
        LayerFigures(
            w_norm=10.0 + b + 0.01 * k,
            update_norm=0.05 / (1 + 0.1 * k),
            drift=0.001 * k * (b + 1),
            inner_loss_before=1.0 / (1 + 0.05 * k) + 0.1 * b,
            inner_loss_after=0.8 / (1 + 0.05 * k) + 0.1 * b,
        )
        for b in range(N_BLOCKS)
    )
    return RunInfo(
        state=state,
        pid=RUN_PID,
        mode="train",
        preset="default",
        exit_code=1 if state == RunState.DEAD else None,
        last_error="RuntimeError: out of memory" if state == RunState.DEAD else None,
        rss=(900 + 3 * k) * MIB,
        cpu_percent=97.5,
        step=10 * k,
        tokens=10 * k * 256,
        tokens_per_s=5000.0 + 400.0 * math.sin(k / 4),
        step_ms=51.2,
        loss_bpb=6.0 / (1 + 0.05 * k) + 1.0,
        inner_lr=0.5,
        sampled_step=10 * k,
        blocks=blocks,
        layers=layers,
        mlx=MlxMemory(
            active=(300 + k) * MIB,
            cache=(100 + 2 * k) * MIB,
            peak=(420 + k) * MIB,
            limit=24 * GIB,
            backend="cpu",
            device="cpu",
        ),  # fmt: skip
        blas="openblas",
    )


def fake_snapshot(k: int, interval: float = 1.0, state: RunState = RunState.RUNNING) -> Snapshot:
    return Snapshot(
        time=START + k * interval,
        interval=interval,
        system=SystemInfo(
            total=24 * GIB, used=(12 * GIB + k * 8 * MIB), available=11 * GIB, cpu_percent=55.0
        ),  # fmt: skip
        processes=fake_processes(k),
        run=fake_run(k, state),
        events=("run running (pid 4242)",) if k == 0 else (),
    )


class FakeRuntime:
    """Records the commands it is sent and answers them like a run would."""

    pid = RUN_PID

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, cmd: str, **fields: Any) -> Reply:
        self.sent.append(cmd)
        return Reply(id=None, cmd=cmd, ok=True)

    def restart(self) -> None:
        self.sent.append("restart")

    def close(self) -> None:
        pass


class FakeMonitor:
    def __init__(self, ticks: int = 30, state: RunState = RunState.RUNNING) -> None:
        self.ticks, self.state = ticks, state
        self.interval = 1.0
        self.runtime = FakeRuntime()
        self._k = 0
        self._events: list[str] = []
        self._closed = threading.Event()

    def post_event(self, text: str) -> None:
        self._events.append(text)

    def tick(self) -> Snapshot:
        if self._k >= self.ticks:
            # Nothing new to show: the app's tick loop logs this and asks again a tick later,
            # and its thread ends soon after the app does.
            self._closed.wait(self.interval)
            raise RuntimeError("no more fake ticks")
        snapshot = fake_snapshot(self._k, state=self.state)
        self._k += 1
        return snapshot

    def close(self, on_wait: Any = None) -> None:
        self._closed.set()
