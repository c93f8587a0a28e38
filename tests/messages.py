"""Well-formed messages of a run, for the tests that play the run's part on a real channel."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ttt_runtime.protocol import (
    BlockTiming,
    Hello,
    LayerFigures,
    MlxReport,
    Telemetry,
    WorkerFigures,
)

HELLO = Hello(
    pid=os.getpid(), run_id="test", mode="train", preset="tiny", config={}, socket="run.sock"
)


def telemetry(step: int, **changes: Any) -> Telemetry:
    """A report of this process's `HELLO` run at `step` (two blocks), with `changes`."""
    report = Telemetry(
        t=1_700_000_000.0 + step,
        pid=HELLO.pid,
        run_id=HELLO.run_id,
        mode=HELLO.mode,
        preset=HELLO.preset,
        paused=False,
        step=step,
        tokens=32 * step,
        tokens_per_s=640.0,
        step_ms=50.0,
        loss_bpb=4.5,
        warmup_ms=900.0,
        inner_lr=0.5,
        conversation=0,
        sampled_step=step,
        blocks=(BlockTiming(1.5, 3.0), BlockTiming(1.25, 2.5)),
        layers=(LayerFigures(2.0, 0.1, 0.01, 1.0, 0.5),) * 2,
        mlx=MlxReport(
            active=1 << 20,
            cache=0,
            peak=2 << 20,
            limit=1 << 34,
            backend="cpu",
            device="cpu",
            memory_size=1 << 34,
            working_set=None,
        ),  # fmt: skip
        blas="openblas",
    )
    return dataclasses.replace(report, **changes)


def worker(stage: int, pid: int, restarts: int = 0) -> WorkerFigures:
    """Stage `stage` of a two-stage Ray run (one block each), as its telemetry reports it."""
    return WorkerFigures(
        stage=stage, replica=0, blocks=(stage,), node_id="ab12", node_ip="127.0.0.1", pid=pid,
        restarts=restarts, rss=200 << 20, active=10 << 20, cache=0, peak=20 << 20, fwd_ms=1.5,
        bwd_ms=3.0, wait_ms=0.25, sync_ms=None, sent=4096, received=8192,
    )  # fmt: skip
