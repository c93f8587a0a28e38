"""SystemSource against the real process table."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from xltop.sources import SystemSource


@pytest.fixture
def child():
    """Factory: a real child Python process running `code`, killed at teardown."""
    procs = []

    def start(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_system_figures_are_sane():
    system, processes = SystemSource(top_n=10).sample()
    assert system.total > 0 and system.available > 0 and system.used > 0
    assert system.used + system.available == system.total
    assert 0.0 <= system.cpu_percent <= 100.0
    assert 0 < len(processes) <= 10
    rss = [p.rss for p in processes]
    assert rss == sorted(rss, reverse=True)


def test_own_process_is_described():
    source = SystemSource(top_n=10_000)
    _, processes = source.sample()
    me = next(p for p in processes if p.pid == os.getpid())
    assert me.rss > 1 << 20
    assert "python" in me.name.lower() or "pytest" in me.name.lower()
    assert "pytest" in me.command or "python" in me.command
    assert me.user
    assert not me.is_run


def test_run_process_is_listed_even_outside_the_top(child):
    sleeper = child("import time; time.sleep(60)")
    source = SystemSource(run_pid_getter=lambda: sleeper.pid, top_n=1)
    _, processes = source.sample()
    assert len(processes) == 2
    run = next(p for p in processes if p.is_run)
    assert run.pid == sleeper.pid and run.rss > 0


def test_busy_process_shows_cpu(child):
    busy = child("while True: pass")
    source = SystemSource(run_pid_getter=lambda: busy.pid, top_n=1)
    cpu = 0.0
    deadline = time.monotonic() + 20
    while cpu < 5.0 and time.monotonic() < deadline:
        time.sleep(0.5)
        _, processes = source.sample()
        cpu = next(p.cpu_percent for p in processes if p.pid == busy.pid)
    assert cpu >= 5.0


def test_vanishing_processes_are_skipped_not_raised():
    # Short-lived processes come and go while we sample: no sample may raise.
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            subprocess.run(["true"])

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        source = SystemSource(top_n=10_000)
        for _ in range(30):
            _, processes = source.sample()
            assert processes
    finally:
        stop.set()
        thread.join()
