"""Where Snapshots come from: the machine and its processes (psutil), and the TTT run.

Sampling must stay cheap enough to run every second forever: the process table is read with
one small read per process (on Linux straight from /proc/PID/stat), and the expensive fields
(user, command line) are fetched only for the processes shown, cached per process and
re-read rarely.
"""

from __future__ import annotations

import heapq
import os
import sys
import time
from dataclasses import dataclass

import psutil

from xltop.snapshot import ProcessInfo, SystemInfo

DETAILS_MAX_AGE_S = 30.0  # user and command line rarely change; re-read them this seldom


@dataclass(frozen=True)
class _Usage:
    rss: int  # bytes
    cpu_seconds: float  # user + system time consumed so far
    name: str
    started: float  # start time in the reader's own units: tells a reused pid apart
    ppid: int


class _ProcfsReader:
    """Linux: one read of /proc/PID/stat gives name, CPU times, RSS and start time."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._ticks = os.sysconf("SC_CLK_TCK")

    def read(self) -> dict[int, _Usage]:
        usage = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:  # os.open/os.read: half the cost of a Python file object, per process
                fd = os.open(f"/proc/{entry}/stat", os.O_RDONLY)
                try:
                    raw = os.read(fd, 4096)
                finally:
                    os.close(fd)
            except OSError:  # vanished or denied mid-scan: skip it
                continue
            # The name sits in parentheses and may itself contain spaces or ')'.
            close = raw.rfind(b")")
            fields = raw[close + 2 :].split()
            if len(fields) < 22:
                continue
            usage[int(entry)] = _Usage(
                rss=int(fields[21]) * self._page,
                cpu_seconds=(int(fields[11]) + int(fields[12])) / self._ticks,
                name=raw[raw.find(b"(") + 1 : close].decode(errors="replace"),
                started=float(fields[19]),
                ppid=int(fields[1]),
            )
        return usage


class _PsutilReader:
    """Elsewhere (macOS): psutil, keeping one Process object per pid across ticks."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def read(self) -> dict[int, _Usage]:
        usage, procs = {}, {}
        for pid in psutil.pids():
            proc = self._procs.get(pid)
            try:
                proc = proc or psutil.Process(pid)
                with proc.oneshot():
                    times = proc.cpu_times()
                    usage[pid] = _Usage(
                        rss=proc.memory_info().rss,
                        cpu_seconds=times.user + times.system,
                        name=proc.name(),
                        started=proc.create_time(),
                        ppid=proc.ppid(),
                    )
            except psutil.Error:  # vanished, zombie or denied mid-scan: skip it
                continue
            procs[pid] = proc
        self._procs = procs
        return usage


@dataclass
class _Details:
    started: float
    user: str
    command: str
    fetched_at: float


def _fetch_details(pid: int, started: float, name: str) -> _Details:
    user, command = "?", name
    try:
        proc = psutil.Process(pid)
        try:
            user = proc.username()
        except (psutil.AccessDenied, KeyError):  # KeyError: uid with no passwd entry
            user = str(proc.uids().real) if hasattr(proc, "uids") else "?"
        # One line whatever the arguments hold (`python -c` scripts carry newlines).
        command = " ".join(" ".join(proc.cmdline()).split()) or f"[{name}]"
    except psutil.Error:
        pass
    return _Details(started, user, command, time.monotonic())


def _family(pid: int | None, usage: dict[int, _Usage]) -> list[int]:
    """`pid` and its descendants among the processes in `usage` (none if it is not there)."""
    if pid not in usage:
        return []
    children: dict[int, list[int]] = {}
    for child, u in usage.items():
        children.setdefault(u.ppid, []).append(child)
    family, todo = [], [pid]
    while todo:
        member = todo.pop()
        if member not in family:  # a pid reused mid-scan could make a loop of parents
            family.append(member)
            todo += children.get(member, [])
    return family


class SystemSource:
    """Machine memory/CPU and the top processes by RSS (plus the run's process, always)."""

    def __init__(
        self,
        top_n: int = 30,
        system: str = sys.platform,  # the OS whose process reader to use
    ):
        self.top_n = top_n
        self._reader = _ProcfsReader() if system.startswith("linux") else _PsutilReader()
        self._details: dict[int, _Details] = {}
        # CPU percentages are deltas: prime the counters so the first sample means something.
        psutil.cpu_percent(None)
        self._last_cpu: dict[int, tuple[float, float]] = {}
        self._last_time = time.monotonic()
        self._remember_cpu(self._reader.read())

    def _remember_cpu(self, usage: dict[int, _Usage]) -> None:
        self._last_cpu = {pid: (u.started, u.cpu_seconds) for pid, u in usage.items()}
        self._last_time = time.monotonic()

    def sample(self, run_pid: int | None = None) -> tuple[SystemInfo, tuple[ProcessInfo, ...]]:
        """The machine and its top processes; `run_pid`'s process is listed (as the run's)
        even outside the top."""
        memory = psutil.virtual_memory()
        system = SystemInfo(
            total=memory.total,
            used=memory.total - memory.available,
            available=memory.available,
            cpu_percent=psutil.cpu_percent(None),
        )
        elapsed = max(time.monotonic() - self._last_time, 1e-6)
        last_cpu = self._last_cpu
        usage = self._reader.read()
        self._remember_cpu(usage)

        def cpu_percent(pid: int, u: _Usage) -> float:
            baseline = last_cpu.get(pid)
            if baseline is None or baseline[0] != u.started:  # new (or a reused pid): no baseline
                return 0.0
            return max(0.0, (u.cpu_seconds - baseline[1]) / elapsed * 100.0)

        shown = heapq.nlargest(self.top_n, usage, key=lambda pid: usage[pid].rss)
        # The run and its workers (its descendants) are listed even outside the top: the
        # processes table's tree view (t) shows them under the run.
        shown += [pid for pid in _family(run_pid, usage) if pid not in shown]
        processes = tuple(
            self._describe(pid, usage[pid], cpu_percent(pid, usage[pid]), pid == run_pid)
            for pid in shown
        )
        self._details = {pid: d for pid, d in self._details.items() if pid in usage}
        return system, processes

    def _describe(self, pid: int, u: _Usage, cpu: float, is_run: bool) -> ProcessInfo:
        details = self._details.get(pid)
        if (
            details is None
            or details.started != u.started
            or time.monotonic() - details.fetched_at > DETAILS_MAX_AGE_S
        ):
            details = self._details[pid] = _fetch_details(pid, u.started, u.name)
        return ProcessInfo(
            pid=pid,
            ppid=u.ppid,
            user=details.user,
            name=u.name,
            rss=u.rss,
            cpu_percent=round(cpu, 1),
            command=details.command,
            is_run=is_run,
        )
