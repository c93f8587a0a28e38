"""The Monitor: one Snapshot per tick from the sources; every view consumes these.

Nothing downstream samples anything: the TUI, the CSV and JSON sinks, the --once table and the
watchdog all read the Snapshot that `tick()` returns.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ttt_runtime.protocol import Reply
from xltop import units
from xltop.snapshot import ClusterState, ProcessInfo, RunInfo, RunState, Snapshot, SystemInfo
from xltop.watchdog import Watchdog

MIN_INTERVAL_S = 0.2  # the floor: the monitor must not eat the machine it watches
MAX_INTERVAL_S = 86400.0  # a tick a day


class ClusterUnavailable(Exception):
    """`cluster_for` cannot watch the cluster a run names; the message says why."""


class SystemSampler(Protocol):
    """The machine and its processes (xltop.sources.SystemSource)."""

    def sample(self, run_pid: int | None = None) -> tuple[SystemInfo, tuple[ProcessInfo, ...]]:
        """The machine's figures and its top processes, `run_pid`'s among them."""


class RuntimeSource(Protocol):
    """A hosted or attached run (xltop.runsources.HostedRun / AttachedRun): what the Monitor,
    the CLI, the app and the watchdog call."""

    @property
    def pid(self) -> int | None: ...

    @property
    def report_age_s(self) -> float | None: ...

    def sample(self) -> RunInfo:
        """The run now; never blocks, never raises (a run that is gone is state "dead")."""

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the run has reported a step; False if it died or the time ran out."""

    def send(self, cmd: str, **fields: Any) -> Reply:
        """The run's reply to a command, or a failed one saying why."""

    def restart(self) -> None:
        """Start a fresh run with the same flags; raises if this source cannot."""

    def close(self, on_wait: Callable[[str], None] | None = None) -> None: ...


class ClusterSource(Protocol):
    """A watched Ray cluster (xltop.raycluster.RayCluster); polls every `interval` seconds."""

    interval: float

    def sample(self) -> ClusterState:
        """The newest state; never blocks, never raises (an unreachable cluster says so)."""

    def events(self) -> list[str]:
        """Deaths, restarts and reachability changes since the last call, oldest first."""

    def close(self) -> None: ...


def _state_change_event(
    before: RunInfo | None, after: RunInfo, report_age_s: float | None
) -> str | None:
    if before is not None and before.state == after.state:
        return None
    if after.state == RunState.STALLED:
        return f"run stalled: no report for {report_age_s or 0:.0f} s (pid {after.pid})"
    if before is not None and before.state == RunState.STALLED and after.state != RunState.DEAD:
        return f"run {after.state} again"
    if after.state == RunState.DEAD:
        error = f": {after.last_error}" if after.last_error else ""
        return f"run stopped ({units.ending(after.exit_code)}){error}"
    if after.state == RunState.RUNNING:
        was_paused = before is not None and before.state == RunState.PAUSED
        return "run resumed" if was_paused else f"run running (pid {after.pid})"
    if after.state == RunState.PAUSED:
        return "run paused"
    return None


def _worker_events(before: RunInfo | None, after: RunInfo) -> list[str]:
    """A Ray stage actor of the run that Ray restarted since `before` (the run goes back to its
    last checkpoint then)."""
    if before is None or before.pid != after.pid:
        return []
    old = {(w.stage, w.replica): w for w in before.workers}
    return [
        f"stage {w.stage} replica {w.replica} (pid {was.pid} on node {was.node_ip}) died; Ray "
        f"restarted it as pid {w.pid} and the run went back to its last checkpoint"
        for w in after.workers
        if (was := old.get((w.stage, w.replica))) is not None and w.restarts > was.restarts
    ]


def _joined(cluster: ClusterState, run: RunInfo | None) -> ClusterState:
    """The cluster with our run's stage actors marked by the run's figures of them (by pid)."""
    workers = {w.pid: w for w in run.workers} if run is not None else {}
    if not workers:
        return cluster
    actors = tuple(
        dataclasses.replace(a, worker=workers[a.pid]) if a.pid in workers else a
        for a in cluster.actors
    )
    return dataclasses.replace(cluster, actors=actors)


BUNDLED_BLAS_HINT = (
    "the run uses MLX's bundled BLAS, ~40x slower at GEMM than OpenBLAS: none was found that "
    "runs here (apt-get install libopenblas0-pthread, or pip's cmeel-openblas on x86-64 with "
    "AVX2) and xltop preloads it"
)


class Monitor:
    def __init__(
        self,
        system: SystemSampler,
        runtime: RuntimeSource | None = None,
        interval: float = 1.0,
        watchdog: Watchdog | None = None,
        cluster: ClusterSource | None = None,
        cluster_for: Callable[[str], ClusterSource] | None = None,
    ):
        """`cluster_for(dashboard_url)`: the cluster to watch once the run says it runs on one
        (a run spread over Ray actors), when no `cluster` is given; ClusterUnavailable if it
        cannot be watched."""
        self.system = system
        self.runtime = runtime
        self.watchdog = watchdog
        self.cluster = cluster
        self.cluster_for = cluster_for
        self.interval = interval
        self._events: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._last_run: RunInfo | None = None
        self._blas_hinted = False
        self._warmup_told_for: int | None = None  # the run pid whose warm-up was posted
        # The first tick waits the floor so CPU percentages cover a real stretch of time.
        self._next_due = time.monotonic() + MIN_INTERVAL_S

    @property
    def interval(self) -> float:
        return self._interval

    @interval.setter
    def interval(self, seconds: float) -> None:
        self._interval = max(MIN_INTERVAL_S, float(seconds))
        if self.cluster is not None:  # its lists are polled at the tick's pace
            self.cluster.interval = self._interval

    def post_event(self, text: str) -> None:
        """Deliver `text` in the next Snapshot's events (thread-safe)."""
        with self._lock:
            self._events.append(text)

    def tick(self) -> Snapshot:
        """Wait until the next tick is due, sample every source, return the Snapshot."""
        delay = self._next_due - time.monotonic()
        if delay > 0:
            self._closed.wait(delay)
        # Keep a fixed rate; after a long stall (waiting for a run) restart the grid from now
        # rather than firing a burst of late ticks.
        now = time.monotonic()
        self._next_due += self._interval
        if self._next_due <= now:
            self._next_due = now + self._interval
        # The run's RSS and CPU come from the process table: it must list the run's process.
        system, processes = self.system.sample(run_pid=self.runtime.pid if self.runtime else None)
        run = self._sample_run(processes)
        if run is not None and self.runtime is not None and self.watchdog is not None:
            for event in self.watchdog.check(run, system, self.runtime):
                self.post_event(event)
        ray = self._sample_cluster(run)
        with self._lock:
            events, self._events = tuple(self._events), []
        return Snapshot(
            time=time.time(),
            interval=self._interval,
            system=system,
            processes=processes,
            run=run,
            ray=ray,
            events=events,
        )

    def _sample_cluster(self, run: RunInfo | None) -> ClusterState | None:
        url = run.ray_dashboard if run is not None else None
        if self.cluster is None and url and self.cluster_for is not None:
            try:
                self.cluster = self.cluster_for(url)
            except ClusterUnavailable as exc:  # e.g. RAY_AUTH_TOKEN_PATH names no readable file
                self.cluster_for = None  # said once; the run is watched without its cluster
                self.post_event(f"cannot watch the run's Ray cluster ({url}): {exc}")
                return None
            self.cluster.interval = self._interval
            self.post_event(f"watching the run's Ray cluster ({url})")
        if self.cluster is None:
            return None
        for event in self.cluster.events():
            self.post_event(event)
        return _joined(self.cluster.sample(), run)

    def _sample_run(self, processes: tuple[ProcessInfo, ...]) -> RunInfo | None:
        if self.runtime is None:
            return None
        run = self.runtime.sample()
        own = next((p for p in processes if p.pid == run.pid and run.state != RunState.DEAD), None)
        if own is not None:
            run = dataclasses.replace(run, rss=own.rss, cpu_percent=own.cpu_percent)
        event = _state_change_event(self._last_run, run, self.runtime.report_age_s)
        if event:
            self.post_event(event)
        for event in _worker_events(self._last_run, run):
            self.post_event(event)
        if run.warmup_ms is not None and run.pid != self._warmup_told_for:
            self._warmup_told_for = run.pid  # once per run process (a restart warms up again)
            self.post_event(f"run's first step (compile/warm-up) took {run.warmup_ms:.0f} ms")
        if run.blas == "bundled" and not self._blas_hinted:
            self._blas_hinted = True  # once per monitor: a hint, not a nag
            self.post_event(BUNDLED_BLAS_HINT)
        self._last_run = run
        return run

    def close(self, on_wait: Callable[[str], None] | None = None) -> None:
        """Wake a waiting tick, stop polling the cluster, and stop the run if this monitor hosts
        it; `on_wait(sentence)` hears what the stop waits for, if it takes more than a second."""
        self._closed.set()
        if self.cluster is not None:
            self.cluster.close()
        if self.runtime is not None:
            self.runtime.close(on_wait)
