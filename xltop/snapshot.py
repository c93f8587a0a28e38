"""The one record every view consumes: a plain-data Snapshot per monitor tick.

No UI types, no MLX, no psutil objects: only numbers and strings, so the TUI, the CSV and JSON
sinks, the --once table and the watchdog all read the same thing. Sizes are bytes, times are
milliseconds unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

# one definition of a run's per-block and per-layer figures: the wire's
from ttt_runtime.protocol import BlockTiming, LayerFigures, WorkerFigures


@dataclass(frozen=True)
class SystemInfo:
    total: int  # bytes
    used: int
    available: int
    cpu_percent: float  # whole machine, 0..100


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    user: str
    name: str
    rss: int  # bytes
    cpu_percent: float  # of one core, like top
    command: str
    is_run: bool = False  # the TTT run xltop hosts or watches
    ppid: int = 0  # the parent's pid (0: none, as for pid 1)


@dataclass(frozen=True)
class MlxMemory:
    active: int
    cache: int
    peak: int
    limit: int  # the run's real ceiling (Metal working set on Apple silicon, else memory size)
    backend: str  # "cpu", "gpu", "cuda"
    device: str  # mx.device_info()["device_name"]


class RunState(str, Enum):
    """Where a run is, as xltop sees it; written as its value ("running") everywhere."""

    STARTING = "starting"  # no report yet
    RUNNING = "running"
    PAUSED = "paused"
    # alive, but no new report for max(5 s, 3 x its slowest recent step), see
    # xltop.runsources.STALL_MIN_S; tokens_per_s and step_ms are then None
    STALLED = "stalled"
    DEAD = "dead"

    def __str__(self) -> str:  # in f-strings and CSV cells too (a str Enum's str is its name)
        return self.value


@dataclass(frozen=True)
class RunInfo:
    """The hosted or attached TTT run, as its telemetry and psutil describe it."""

    state: RunState
    pid: int | None = None
    mode: str = ""
    preset: str = ""
    exit_code: int | None = None
    last_error: str | None = None  # "Type: message" of the run's last error
    rss: int | None = None  # from psutil, bytes
    cpu_percent: float | None = None
    step: int = 0
    tokens: int = 0
    tokens_per_s: float | None = None
    step_ms: float | None = None
    loss_bpb: float | None = None
    warmup_ms: float | None = None  # the run's first step, which compiles: kept out of step_ms
    inner_lr: float | None = None
    # adapt mode: the unadapted base's bpb on the last sampled chunk, and the mean over the
    # sampled chunks of loss_bpb - baseline_bpb (below 0: adapting helps); None in train mode
    baseline_bpb: float | None = None
    gain: float | None = None
    conversation: int = 0
    sampled_step: int | None = None
    blocks: tuple[BlockTiming, ...] = ()
    layers: tuple[LayerFigures, ...] = ()
    mlx: MlxMemory | None = None
    blas: str = ""
    user: dict[str, float | None] = field(default_factory=dict)  # a user loop's extra scalars
    workers: tuple[WorkerFigures, ...] = ()  # a run spread over Ray actors: one per actor
    ray_dashboard: str | None = None  # that run's cluster's dashboard, where it serves one


SHORT_ID = 8  # Ray's node and actor ids are 56 hex digits: 8 tell a cluster's apart


@dataclass(frozen=True)
class ClusterNode:
    """A node of the watched Ray cluster (xltop.raycluster reads them)."""

    node_id: str
    ip: str
    is_head: bool
    alive: bool
    state_message: str | None  # why a dead node died, as Ray says it
    cpus: float  # logical CPU resource
    gpus: float  # logical GPU resource
    object_store_total: int  # bytes
    # From the node's own stats (refreshed every ~5 s; None until read, or dead):
    cpu_percent: float | None = None  # the whole host, 0..100
    memory_used: int | None = None  # bytes, the whole host (total - available, like top)
    memory_total: int | None = None
    object_store_used: int | None = None

    @property
    def label(self) -> str:
        """Its short id, "head" after the head node's."""
        return f"{self.node_id[:SHORT_ID]}{' head' if self.is_head else ''}"


@dataclass(frozen=True)
class ClusterActor:
    actor_id: str
    class_name: str
    name: str  # "" for an unnamed actor
    state: str  # Ray's: DEPENDENCIES_UNREADY, PENDING_CREATION, ALIVE, RESTARTING, DEAD
    pid: int | None
    node_id: str | None
    num_restarts: int
    death_cause: str | None  # one line: "REASON: first sentence of Ray's message"
    rss: int | None = None  # bytes, from the node's process stats (None until read)
    cpu_percent: float | None = None  # of one core, like top
    # our run's stage actors only: the run's own figures of it, joined by pid by the monitor
    worker: WorkerFigures | None = None

    @property
    def label(self) -> str:
        """Its class and name (an unnamed actor's id instead), as events and the panel say it."""
        return f"{self.class_name} {self.name or self.actor_id[:SHORT_ID]}"


@dataclass(frozen=True)
class ClusterState:
    """The watched Ray cluster (`--ray`) at its newest poll."""

    address: str  # the dashboard's URL
    reachable: bool
    nodes: tuple[ClusterNode, ...] = ()  # empty while unreachable: nothing stale is shown
    actors: tuple[ClusterActor, ...] = ()
    unreachable_since: float | None = None  # unix seconds
    error: str | None = None  # one line: why nothing could be read (None before the first poll)
    polled_at: float | None = None  # unix seconds of the newest answer

    @property
    def nodes_alive(self) -> int:
        return sum(node.alive for node in self.nodes)

    @property
    def actors_alive(self) -> int:
        return sum(actor.state == "ALIVE" for actor in self.actors)

    @property
    def restarts(self) -> int:
        return sum(actor.num_restarts for actor in self.actors)

    def _alive(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive]

    @property
    def object_store_total(self) -> int:
        return sum(node.object_store_total for node in self._alive())

    @property
    def object_store_used(self) -> int | None:
        """Bytes in the alive nodes' object stores; None before node stats are read."""
        figures = [n.object_store_used for n in self._alive() if n.object_store_used is not None]
        return sum(figures) if figures else None

    def _hosts(self) -> list[ClusterNode]:
        """One alive node with stats per host: nodes sharing a machine share its CPU and
        memory, which must be counted once."""
        hosts: dict[str, ClusterNode] = {}
        for node in self._alive():
            if node.memory_total is not None:
                hosts.setdefault(node.ip, node)
        return list(hosts.values())

    @property
    def memory_used(self) -> int | None:
        """Bytes used on the cluster's hosts; None before node stats are read."""
        hosts = self._hosts()
        return sum(node.memory_used or 0 for node in hosts) if hosts else None

    @property
    def memory_total(self) -> int | None:
        hosts = self._hosts()
        return sum(node.memory_total or 0 for node in hosts) if hosts else None

    @property
    def cpu_percent(self) -> float | None:
        """Mean CPU use of the cluster's hosts, 0..100; None before node stats are read."""
        figures = [node.cpu_percent for node in self._hosts() if node.cpu_percent is not None]
        return sum(figures) / len(figures) if figures else None


@dataclass(frozen=True)
class Snapshot:
    time: float  # unix seconds
    interval: float  # seconds between ticks
    system: SystemInfo
    processes: tuple[ProcessInfo, ...] = ()
    run: RunInfo | None = None  # None with --no-run
    ray: ClusterState | None = None  # None unless a Ray cluster is watched (--ray)
    events: tuple[str, ...] = field(default_factory=tuple)  # what happened since the last tick
