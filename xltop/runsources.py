"""The TTT run as a source: hosted (xltop spawns it) or attached (started elsewhere).

Both read the run's telemetry over its channel (ttt_runtime.channel, which never imports MLX)
and turn the newest report, checked on receipt (ttt_runtime.protocol.Telemetry), into a
RunInfo. `sample()` never blocks and never raises: a run that is gone is a RunInfo with state
"dead", its exit code and its last error; one whose reports have stopped (SIGSTOPped, or stuck
in a step) is "stalled" until they resume.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ttt_runtime.channel import MAX_LINE, ChannelClient, ChannelError
from ttt_runtime.protocol import (
    BlockTiming,
    Hello,
    LayerFigures,
    MlxReport,
    Reply,
    Telemetry,
    json_data,
)
from xltop.snapshot import MlxMemory, RunInfo, RunState

SEND_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 10.0
RAY_STOP_TIMEOUT_S = 40.0  # a Ray run also stops its actors, and a private cluster with them

# A run reports once per step, and once a second while paused (ttt_runtime.run's
# PAUSED_REPORT_S). It is stalled when xltop has read no new report for
# max(STALL_MIN_S, STALL_STEPS x its slowest step among the last STALL_WINDOW reports): never
# sooner than a few missed reports of a paused run or of fast steps on a loaded machine, and a
# run whose steps take seconds gets a few of its own steps. Before any step is timed, its
# warm-up (compile) step stands for the step time. Before its first report a run is "starting".
STALL_MIN_S = 5.0
STALL_STEPS = 3
STALL_WINDOW = 32  # more than `sample_every` (20) steps: a slower sampled step is among them

_EMPTY_BLOCK = (BlockTiming(None, None), LayerFigures(None, None, None, None, None))
# A report is one line of at most MAX_LINE bytes carrying every block's timing and figures: a
# hello claiming more blocks than one line could carry (or a count that is not an integer) is
# not believed, and lays out no blocks, rather than rows (and CSV columns) by the billion.
MAX_LAYOUT_BLOCKS = MAX_LINE // len(json.dumps(json_data(_EMPTY_BLOCK), separators=(",", ":")))


class RunSourceError(Exception):
    """The run cannot be started or reached; the message says which and why."""


def validate_run_args(argv: list[str]) -> str | None:
    """The one-line error a run would exit with for these flags, or None if they are fine."""
    from ttt_runtime.launch import check_run_args

    return check_run_args(argv)


def _mlx_memory(mlx: MlxReport) -> MlxMemory:
    return MlxMemory(
        active=mlx.active,
        cache=mlx.cache,
        peak=mlx.peak,
        # The real ceiling: Metal's working set on Apple silicon, else the machine's memory.
        limit=mlx.working_set or mlx.memory_size or mlx.limit,
        backend=mlx.backend,
        device=mlx.device,
    )


def stall_after_s(recent_step_ms: Iterable[float]) -> float:
    """Seconds without a new report after which a run is stalled (see STALL_MIN_S)."""
    return max(STALL_MIN_S, STALL_STEPS * max(recent_step_ms, default=0.0) / 1e3)


def run_info_from_telemetry(report: Telemetry) -> RunInfo:
    """One telemetry message as a RunInfo."""
    return RunInfo(
        state=RunState.PAUSED if report.paused else RunState.RUNNING,
        pid=report.pid,
        mode=report.mode,
        preset=report.preset,
        step=report.step,
        tokens=report.tokens,
        tokens_per_s=report.tokens_per_s,
        step_ms=report.step_ms,
        loss_bpb=report.loss_bpb,
        warmup_ms=report.warmup_ms,
        inner_lr=report.inner_lr,
        baseline_bpb=report.baseline_bpb,
        gain=report.gain,
        conversation=report.conversation,
        sampled_step=report.sampled_step,
        blocks=report.blocks,
        layers=report.layers,
        mlx=_mlx_memory(report.mlx),
        blas=report.blas,
        user=report.user,
        workers=report.workers,
    )


def _error_text(client: ChannelClient | None) -> str | None:
    error = client.last_error if client is not None else None
    return f"{error.exc_type}: {error.message}" if error else None


class _ChannelRun:
    """What hosted and attached runs share: reading telemetry and sending commands."""

    _client: ChannelClient | None = None

    def __init__(self) -> None:
        self._forget_reports()

    def _forget_reports(self) -> None:
        self._last: RunInfo | None = None  # the newest good report
        self._last_report: Telemetry | None = None
        self._report_at: float | None = None  # monotonic time the newest report was first read
        self._step_ms: deque[float] = deque(maxlen=STALL_WINDOW)

    @property
    def report_age_s(self) -> float | None:
        """Seconds since xltop first read the run's newest report; None before its first."""
        return None if self._report_at is None else time.monotonic() - self._report_at

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def sample(self) -> RunInfo:
        raise NotImplementedError

    def _hello(self) -> Hello | None:
        return self._client.hello if self._client is not None else None

    def _hello_info(self, state: RunState) -> RunInfo:
        hello = self._hello()
        if hello is None:
            return RunInfo(state=state, pid=self.pid)
        return self._with_hello(
            RunInfo(state=state, pid=self.pid, mode=hello.mode, preset=hello.preset)
        )

    def _with_hello(self, info: RunInfo) -> RunInfo:
        """What the run's hello adds: its cluster's dashboard (a run spread over Ray actors),
        and empty stats for every block and layer until the run's first sampled step, so the
        layout (and a CSV's columns) is known from the start: one TTT layer per block."""
        hello = self._hello()
        if hello is not None and hello.ray_dashboard:
            info = dataclasses.replace(info, ray_dashboard=hello.ray_dashboard)
        if info.blocks:
            return info
        n = hello.config.get("num_blocks") if hello is not None else None
        if type(n) is not int or not 0 < n <= MAX_LAYOUT_BLOCKS:  # bool is no count
            return info
        timing, figures = _EMPTY_BLOCK
        return dataclasses.replace(info, blocks=(timing,) * n, layers=(figures,) * n)

    def _live_info(self) -> RunInfo:
        client = self._client
        # the newest report that passed the channel's checks: a malformed one never gets here
        report = client.latest() if client is not None else None
        if report is not None and report is not self._last_report:
            self._last_report, self._report_at = report, time.monotonic()
            self._last = self._with_hello(run_info_from_telemetry(report))
            self._step_ms.append(self._last.step_ms or self._last.warmup_ms or 0.0)
        if self._last is None:
            return self._hello_info(RunState.STARTING)
        age = self.report_age_s  # known: a report was read
        if age is not None and age > stall_after_s(self._step_ms):
            # The last figures stand, but not the last step's throughput: no step completes.
            return dataclasses.replace(
                self._last, state=RunState.STALLED, tokens_per_s=None, step_ms=None
            )
        return self._last

    def _dead_info(self, exit_code: int | None, fallback_error: str | None) -> RunInfo:
        base = self._last or self._hello_info(RunState.DEAD)
        return dataclasses.replace(
            base,
            state=RunState.DEAD,
            exit_code=exit_code,
            last_error=_error_text(self._client) or fallback_error,
            rss=None,
            cpu_percent=None,
        )

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the run has reported a step; False if it died or the time ran out."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.sample()
            if info.state in (RunState.RUNNING, RunState.PAUSED, RunState.STALLED):  # reported
                return True
            if info.state == RunState.DEAD or time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def send(self, cmd: str, **fields: Any) -> Reply:
        """Send a command; the run's reply, or a failed one saying why, within the timeout."""
        client = self._client
        if client is None or not client.alive:
            return Reply(id=None, cmd=cmd, ok=False, error="run is not running")
        try:
            return client.request(cmd, timeout=SEND_TIMEOUT_S, **fields)
        except (ChannelError, OSError, TimeoutError) as exc:
            return Reply(id=None, cmd=cmd, ok=False, error=str(exc) or type(exc).__name__)


class AttachedRun(_ChannelRun):
    """A run started elsewhere (`ttt-run --socket PATH`), watched through its socket."""

    _client: ChannelClient  # connected for the source's whole life

    def __init__(self, socket_path: str, timeout: float = 5.0):
        super().__init__()
        self.socket_path = socket_path
        try:
            self._client = ChannelClient.connect(socket_path, timeout=timeout)
        except (ChannelError, OSError) as exc:
            raise RunSourceError(f"cannot attach to {socket_path}: {exc}") from None

    @property
    def pid(self) -> int | None:
        hello = self._client.hello  # connect() waited for it
        return hello.pid if hello is not None else None

    def sample(self) -> RunInfo:
        if not self._client.alive:
            bye = self._client.bye  # a clean exit says goodbye with its exit code
            return self._dead_info(bye.exit_code if bye else None, "channel closed")
        return self._live_info()

    def restart(self) -> None:
        raise RunSourceError("an attached run is restarted where it was started, not from xltop")

    def close(self, on_wait: Callable[[str], None] | None = None) -> None:
        """Detach; the run goes on (so there is never anything to wait for)."""
        self._client.close()


class HostedRun(_ChannelRun):
    """A run xltop spawns (a fresh interpreter, OpenBLAS preloaded) and stops on close."""

    def __init__(self, run_args: list[str], preload_blas: bool = True):
        super().__init__()
        self.run_args = list(run_args)
        self.preload_blas = preload_blas
        self._lock = threading.Lock()
        self._closing = False
        self._start()

    def _start(self) -> None:
        from ttt_runtime.launch import spawn_run

        try:
            self._proc = spawn_run(self.run_args, preload_blas=self.preload_blas)
        except (OSError, ValueError) as exc:
            raise RunSourceError(f"cannot start the run: {exc}") from None
        self._client = None
        self._forget_reports()
        threading.Thread(target=self._connect, args=(self._proc,), daemon=True).start()

    def _connect(self, proc: Any) -> None:
        # The run needs a few seconds (importing MLX) before its socket answers.
        while proc.poll() is None and not self._closing:
            try:
                client = ChannelClient.connect(proc.socket_path, timeout=1.0)
            except (ChannelError, OSError):
                time.sleep(0.1)
                continue
            with self._lock:
                if proc is self._proc and not self._closing:
                    self._client = client
                    return
            client.close()
            return

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def sample(self) -> RunInfo:
        exit_code = self._proc.poll()
        if exit_code is not None:
            tail = [line for line in self._proc.stderr_tail().splitlines() if line.strip()]
            return self._dead_info(exit_code, tail[-1] if tail else None)
        return self._live_info()

    def restart(self) -> None:
        """Stop the current run (if it still runs) and start a fresh one with the same flags."""
        self._stop()
        self._start()

    def _stop(self, on_wait: Callable[[str], None] | None = None) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        ray = "--ray" in self.run_args
        self._proc.stop(RAY_STOP_TIMEOUT_S if ray else STOP_TIMEOUT_S, on_wait=on_wait)

    def close(self, on_wait: Callable[[str], None] | None = None) -> None:
        """Stop the run; `on_wait(sentence)` hears what it waits for if that takes a while."""
        self._closing = True
        self._stop(on_wait)
