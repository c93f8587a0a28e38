"""Memory watchdog: soft limit clears the run's MLX cache, hard limit pauses the run.

The watched figure is the run's memory: the larger of its RSS (psutil) and the MLX active +
cache bytes it reports (on Apple silicon MLX's buffers need not show up in RSS). Each limit
fires once when crossed and re-arms when memory falls back below it, so a user who resumes a
paused run is not overruled on the next tick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from ttt_runtime.protocol import Reply
from xltop.snapshot import RunInfo, RunState, SystemInfo
from xltop.units import MIB

MAX_SIZE = 1 << 50  # 1 PiB: more than any machine's memory
_THRESHOLD = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%|mib|m|gib|g)?\s*$", re.IGNORECASE)


class Commandable(Protocol):
    def send(self, cmd: str, **fields: Any) -> Reply: ...


@dataclass(frozen=True)
class Threshold:
    """A memory limit: a percent of total memory, or an absolute size in bytes."""

    percent: float | None = None
    size: int | None = None

    @classmethod
    def parse(cls, text: str) -> Threshold:
        """'80%' is a percent of total memory; '4096', '4096MiB' or '4GiB' a size."""
        match = _THRESHOLD.match(text)
        if not match or float(match.group(1)) <= 0:
            raise ValueError(f"{text!r} is not a memory limit (use e.g. 80% or 4096MiB or 4GiB)")
        value, unit = float(match.group(1)), (match.group(2) or "mib").lower()
        if unit == "%":
            if value > 100:
                raise ValueError(f"{text!r}: a percent of total memory must be at most 100")
            return cls(percent=value)
        size = value * MIB * (1024 if unit.startswith("g") else 1)
        if size >= MAX_SIZE:  # 400 nines parse as infinity
            raise ValueError("a memory size must be below 1 PiB")
        return cls(size=int(size))

    def bytes_of(self, total: int) -> int:
        return int(total * self.percent / 100) if self.percent is not None else self.size or 0

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return f"{(self.size or 0) / MIB:.0f} MiB"


def run_memory(run: RunInfo) -> int:
    mlx = run.mlx.active + run.mlx.cache if run.mlx else 0
    return max(run.rss or 0, mlx)


class _Limit:
    def __init__(self, name: str, threshold: Threshold, cmd: str, action: str):
        self.name, self.threshold, self.cmd, self.action = name, threshold, cmd, action
        self.armed = True

    def check(self, used: int, total: int, runtime: Commandable) -> str | None:
        limit = self.threshold.bytes_of(total)
        if used < limit:
            self.armed = True
            return None
        if not self.armed:
            return None
        self.armed = False
        reply = runtime.send(self.cmd)
        outcome = self.action if reply.ok else f"{self.action} FAILED: {reply.error}"
        return (
            f"watchdog: run memory {used / MIB:.0f} MiB >= {self.name} limit "
            f"{self.threshold} ({limit / MIB:.0f} MiB): {outcome}"
        )


class Watchdog:
    def __init__(self, soft: Threshold | None = None, hard: Threshold | None = None):
        self.soft, self.hard = soft, hard
        self._limits = [
            _Limit(name, t, cmd, action)
            for name, t, cmd, action in (
                ("soft", soft, "clear_cache", "asked the run to clear its MLX cache"),
                ("hard", hard, "pause", "paused the run"),
            )
            if t is not None
        ]

    def check(self, run: RunInfo | None, system: SystemInfo, runtime: Commandable) -> list[str]:
        """Act on this tick's figures; return the events to show and log."""
        if run is None or run.state not in (RunState.RUNNING, RunState.PAUSED):
            return []
        used = run_memory(run)
        events = (limit.check(used, system.total, runtime) for limit in self._limits)
        return [event for event in events if event]
