"""Helpers for xltop's tests: the real CLI in a real child process, CSV reading, waiting."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from polling import run_client, wait_until

REPO = Path(__file__).resolve().parents[2]


def xltop_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("LD_PRELOAD", None)
    return env


def run_xltop(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run `python -m xltop ARGS` to completion (stdin closed, stdout a pipe: not a TTY)."""
    return subprocess.run(
        [sys.executable, "-m", "xltop", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=xltop_env(),
        cwd=REPO,
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    """Parse a CSV log with nothing but the csv module (what the README promises)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll until the log at `path` has at least `n` complete rows."""

    def enough() -> bool:
        assert proc.poll() is None, f"xltop exited early: {proc.communicate()}"
        return path.exists() and path.read_text().count("\n") >= n + 1

    wait_until(enough, timeout, f"{n} rows in {path}", interval=0.1)


def wait_for_socket(run, timeout: float = 120.0):
    """Return `run` (a RunProcess) once its socket answers: importing MLX takes a while."""
    run_client(run, timeout).close()
    return run


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_pid(pid: int) -> None:
    """Stop a process a test left behind on purpose (e.g. the run of a SIGKILLed xltop)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
