"""Killing a process from the monitor: refusals first, then SIGTERM, then SIGKILL.

A kill is locked onto one process: `lock_target` records its start time when the user selects it,
and `kill` refuses if that pid now belongs to another process (the list re-sorted, or the pid was
reused). Every outcome is a sentence for the user, never silence and never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

GRACE_S = 3.0  # between SIGTERM and SIGKILL


@dataclass(frozen=True)
class KillTarget:
    """The process the user chose, as it was when chosen."""

    pid: int
    name: str
    user: str
    command: str
    started: float  # psutil create_time: tells a reused pid apart


@dataclass(frozen=True)
class KillResult:
    ok: bool
    message: str


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def refusal(pid: int, own_pid: int | None = None) -> str | None:
    """Why xltop will not kill `pid`, or None if it may."""
    own_pid = os.getpid() if own_pid is None else own_pid
    if pid < 1:  # kill(0) and kill(-1) would signal a group of processes, not one
        return f"refused: pid {pid} is not a process id (they start at 1)"
    if pid == 1:
        return f"refused: pid {pid} is the system's init process"
    if pid == own_pid:
        return f"refused: pid {pid} is xltop itself (press q to quit)"
    if not _is_root():
        try:
            uids = psutil.Process(pid).uids()
        except psutil.NoSuchProcess:
            return f"pid {pid} is gone already"
        except psutil.AccessDenied:
            return f"refused: pid {pid} belongs to another user"
        if uids.real != os.getuid():
            return f"refused: pid {pid} belongs to another user (uid {uids.real})"
    return None


def lock_target(pid: int, own_pid: int | None = None) -> KillTarget | str:
    """The KillTarget for `pid`, or the sentence saying why it cannot be killed."""
    reason = refusal(pid, own_pid)
    if reason:
        return reason
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            name, user, started = proc.name(), proc.username(), proc.create_time()
        command = " ".join(proc.cmdline()) or name
    except psutil.NoSuchProcess:
        return f"pid {pid} is gone already"
    except psutil.AccessDenied:
        return f"refused: no permission to inspect pid {pid}"
    return KillTarget(pid=pid, name=name, user=user, command=command, started=started)


def _ended(proc: psutil.Process, timeout: float) -> bool:
    """Wait for `proc` to exit; a zombie (exited, not yet reaped by its parent) counts."""
    try:
        proc.wait(timeout)
        return True
    except psutil.TimeoutExpired:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True


def kill(target: KillTarget, grace: float = GRACE_S) -> KillResult:
    """SIGTERM the target, SIGKILL it if it is still there after `grace` seconds."""
    label = f"pid {target.pid} ({target.name})"
    try:
        proc = psutil.Process(target.pid)
        if proc.create_time() != target.started:
            return KillResult(False, f"not killed: {label} exited and its pid was reused")
        proc.terminate()
        if _ended(proc, grace):
            return KillResult(True, f"{label} ended on SIGTERM")
        proc.kill()
        if _ended(proc, grace):
            return KillResult(True, f"{label} ignored SIGTERM for {grace:g} s; ended on SIGKILL")
        return KillResult(False, f"{label} survived SIGKILL for {grace:g} s (uninterruptible?)")
    except psutil.NoSuchProcess:
        return KillResult(False, f"not killed: {label} was gone already")
    except psutil.AccessDenied:
        return KillResult(False, f"not killed: permission denied for {label}")
