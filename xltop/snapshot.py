"""The one record every view consumes: a plain-data Snapshot per monitor tick.

No UI types, no MLX, no psutil objects: only numbers and strings, so the TUI, the CSV and JSON
sinks, the --once table and the watchdog all read the same thing. Sizes are bytes, times are
milliseconds unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

# one definition of a run's per-block and per-layer figures: the wire's
from ttt_runtime.protocol import BlockTiming, LayerFigures


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
    conversation: int = 0
    sampled_step: int | None = None
    blocks: tuple[BlockTiming, ...] = ()
    layers: tuple[LayerFigures, ...] = ()
    mlx: MlxMemory | None = None
    blas: str = ""


@dataclass(frozen=True)
class RayNode:
    node_id: str
    address: str
    alive: bool
    cpus: float
    memory: int  # bytes, logical resource
    object_store: int  # bytes


@dataclass(frozen=True)
class RayInfo:
    address: str
    nodes: tuple[RayNode, ...] = ()
    actors: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    time: float  # unix seconds
    interval: float  # seconds between ticks
    system: SystemInfo
    processes: tuple[ProcessInfo, ...] = ()
    run: RunInfo | None = None  # None with --no-run
    ray: RayInfo | None = None
    events: tuple[str, ...] = field(default_factory=tuple)  # what happened since the last tick
