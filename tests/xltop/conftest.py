"""Fixtures for xltop's tests (helpers live in xltop_helpers.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from ray_helpers import THREE_ACTORS, LocalRayCluster, RunningCluster, ray_missing
from xltop_helpers import REPO, process_gone, read_rows, wait_for_socket, xltop_env

from xltop.monitor import Monitor
from xltop.sources import SystemSource

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
def monitors():
    """Factory for real Monitors; every one is closed (and its hosted run stopped) at teardown."""
    made: list[Monitor] = []

    def make(runtime=None, top_n: int = 30) -> Monitor:
        monitor = Monitor(SystemSource(top_n=top_n), runtime, interval=0.2)
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.close()


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


@pytest.fixture
def no_ray_settings(tmp_path, monkeypatch) -> Path:
    """No token or address from the machine running the tests: a private HOME, no RAY_*. A
    test module watching real clusters uses it everywhere (pytestmark usefixtures)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith("RAY_"):
            monkeypatch.delenv(name)
    return home


def start_cluster(token: str | None = None) -> LocalRayCluster:
    """A LocalRayCluster not started yet; the test is skipped where Ray is not installed."""
    if reason := ray_missing():
        pytest.skip(reason)
    return LocalRayCluster(token=token)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RunningCluster]:
    """A head, a second raylet and a driver with three actors, one cluster for each test module
    that asks (~10 s to start, ~2 GiB while it runs); stopped (process groups, temp dir) at the
    end of that module, so a module may stop parts of it in its last tests."""
    cluster = start_cluster()
    try:
        head = cluster.start_head()
        node = cluster.add_node()
        yield RunningCluster(cluster, head, node, cluster.start_driver(THREE_ACTORS))
    finally:
        cluster.stop()
