"""Fixtures for xltop's tests: the real CLI in a real child process, always stopped."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


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


@pytest.fixture
def xltop_process() -> Callable[..., subprocess.Popen]:
    """Factory: start `python -m xltop ARGS` in the background; killed at teardown if alive."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xltop", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=xltop_env(),
            cwd=REPO,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.communicate()


def read_rows(path: Path) -> list[dict[str, str]]:
    """Parse a CSV log with nothing but the csv module (what the README promises)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll until the log at `path` has at least `n` complete rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"xltop exited early: {proc.communicate()}"
        if path.exists():
            text = path.read_text()
            if text.count("\n") >= n + 1:
                return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} rows in {path} after {timeout} s")


@pytest.fixture
def tiny_run():
    """Factory: a real `ttt-run` (tiny preset), returned once its socket answers; stopped at
    teardown."""
    from ttt_runtime.channel import ChannelClient, ChannelError
    from ttt_runtime.launch import spawn_run

    runs = []

    def start(*args: str):
        run = spawn_run(["--preset", "tiny", *args])
        runs.append(run)
        deadline = time.monotonic() + 120  # importing MLX on a loaded machine
        while True:
            assert run.poll() is None, run.stderr_tail()
            try:
                ChannelClient.connect(run.socket_path, timeout=1.0).close()
                return run
            except ChannelError:
                assert time.monotonic() < deadline, "the run's socket never answered"
                time.sleep(0.1)

    yield start
    for run in runs:
        run.stop(10.0)


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
