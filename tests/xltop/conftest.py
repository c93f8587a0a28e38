"""Fixtures for xltop's tests (helpers live in xltop_helpers.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import pytest
from xltop_helpers import REPO, process_gone, read_rows, wait_for_socket, xltop_env

__all__ = ["process_gone", "read_rows"]  # test_app.py imports these from here


@pytest.fixture
def xltop_process() -> Callable[..., subprocess.Popen]:
    """Factory: start `python -m xltop ARGS` in the background; stopped at teardown if alive."""
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
            start_new_session=True,  # a process group of its own, as a terminal gives it
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


@pytest.fixture
def tiny_run(spawned_run):
    """Factory: a tiny run (tests/conftest.py's spawned_run), returned once its socket answers;
    stopped at teardown by spawned_run."""

    def start(*args: str):
        return wait_for_socket(spawned_run(*args))

    return start


@pytest.fixture
def children() -> Callable[..., subprocess.Popen]:
    """Factory: real child processes, returned once exec has finished; killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(*argv: str, **popen_kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **popen_kwargs)
        started.append(proc)
        # Popen returns as the child's exec begins: its name can be the new one while its command
        # line is still empty for a moment. Tests that read the command wait for it here.
        deadline = time.monotonic() + 10
        while not psutil.Process(proc.pid).cmdline() and time.monotonic() < deadline:
            time.sleep(0.005)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
