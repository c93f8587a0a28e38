"""Fixtures for xltop's tests (helpers live in xltop_helpers.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable

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
