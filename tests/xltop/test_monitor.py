"""The Monitor with the real SystemSource (no run)."""

from __future__ import annotations

import threading
import time

from xltop.monitor import MIN_INTERVAL_S, Monitor
from xltop.sources import SystemSource


def test_interval_has_a_floor():
    monitor = Monitor(SystemSource(), interval=0.01)
    assert monitor.interval == MIN_INTERVAL_S
    monitor.interval = 3
    assert monitor.interval == 3.0
    monitor.interval = 0
    assert monitor.interval == MIN_INTERVAL_S


def test_ticks_are_spaced_by_the_interval():
    monitor = Monitor(SystemSource(), interval=0.3)
    snapshots = [monitor.tick() for _ in range(3)]
    assert snapshots[2].time - snapshots[0].time >= 0.55
    assert all(s.run is None and s.interval == 0.3 for s in snapshots)
    assert all(s.system.total > 0 and s.processes for s in snapshots)


def test_events_arrive_once_in_the_next_snapshot():
    monitor = Monitor(SystemSource(), interval=0.2)
    monitor.post_event("hello")
    assert monitor.tick().events == ("hello",)
    assert monitor.tick().events == ()


def test_close_wakes_a_waiting_tick():
    monitor = Monitor(SystemSource(), interval=60)
    monitor.tick()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (monitor.tick(), done.set()))
    thread.start()
    time.sleep(0.2)
    monitor.close()
    thread.join(10)
    assert done.is_set()


def test_monitor_makes_the_system_source_follow_its_run():
    source = SystemSource()
    assert source.run_pid_getter is None
    Monitor(source)
    assert source.run_pid_getter() is None  # no run: nothing to follow


def test_a_late_first_tick_does_not_cause_a_burst():
    monitor = Monitor(SystemSource(), interval=0.5)
    time.sleep(1.5)  # e.g. waiting for a run's first step
    first, second = monitor.tick(), monitor.tick()
    assert second.time - first.time >= 0.4
