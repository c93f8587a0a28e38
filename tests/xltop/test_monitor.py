"""The Monitor with the real SystemSource, without a run and with a real hosted one."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import jsonschema
from messages import HELLO, telemetry, worker
from polling import wait_until
from xltop_helpers import process_gone, read_rows, wait_for_rows

from ttt_runtime.channel import ChannelServer
from xltop.cli import _cluster_for, build_parser
from xltop.csvlog import CsvLog
from xltop.jsonout import snapshot_to_line
from xltop.monitor import MIN_INTERVAL_S, Monitor
from xltop.runsources import STALL_MIN_S, AttachedRun, HostedRun
from xltop.snapshot import RunState
from xltop.sources import SystemSource
from xltop.table import format_snapshot


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


def test_a_late_first_tick_does_not_cause_a_burst():
    monitor = Monitor(SystemSource(), interval=0.5)
    time.sleep(1.5)  # e.g. waiting for a run's first step
    first, second = monitor.tick(), monitor.tick()
    assert second.time - first.time >= 0.4


def test_a_malformed_report_is_refused_and_the_monitor_keeps_the_last_good_one(tmp_path):
    # the run's part played on the real channel; a report built with a wrong type (a bug in the
    # run) is refused on receipt, so no view ever meets a string where a number belongs
    server = ChannelServer(str(tmp_path / "run.sock"), HELLO)
    monitor = Monitor(SystemSource(top_n=1), AttachedRun(server.path), interval=0.2)
    try:
        server.publish(telemetry(5))
        wait_until(lambda: monitor.runtime.sample().step == 5, what="the good report")
        server.publish(telemetry(6, tokens_per_s="fast", layers=({"w_norm": 1.0},)))
        # the reply comes after that report on the same connection: it has been read by now
        assert monitor.runtime.send("hello").ok
        snapshot = monitor.tick()
        assert snapshot.run.state == RunState.RUNNING
        assert snapshot.run.step == 5 and snapshot.run.tokens_per_s == 640.0
        assert "640 tok/s" in format_snapshot(snapshot)
        assert json.loads(snapshot_to_line(snapshot))["run"]["step"] == 5
        server.publish(telemetry(7))  # the stream goes on
        wait_until(lambda: monitor.runtime.sample().step == 7, what="the next good report")
    finally:
        monitor.close()
        server.close()


def continue_pid(pid: int) -> None:
    """Undo a test's SIGSTOP, if the process still exists."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def tick_until_event(monitor: Monitor, prefix: str, timeout: float):
    """Tick until an event begins with `prefix`; (that event, its Snapshot)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = monitor.tick()
        event = next((e for e in snapshot.events if e.startswith(prefix)), None)
        if event is not None:
            return event, snapshot
    raise AssertionError(f"no event {prefix!r} within {timeout} s")


def test_a_restarted_stage_actor_is_an_event_and_keeps_its_columns(tmp_path):
    """A Ray run's telemetry: Ray restarted stage 1's actor (a new pid, one more restart)."""
    server = ChannelServer(str(tmp_path / "run.sock"), HELLO)
    monitor = Monitor(SystemSource(top_n=1), AttachedRun(server.path), interval=0.2)
    log = None
    try:
        server.publish(telemetry(5, workers=(worker(0, 101), worker(1, 102))))
        wait_until(lambda: monitor.runtime.sample().step == 5, what="the first report")
        log = CsvLog.open(tmp_path / "run.csv", first := monitor.tick())
        log.write(first)
        server.publish(telemetry(6, workers=(worker(0, 101), worker(1, 203, restarts=1))))
        event, snapshot = tick_until_event(monitor, "stage 1 replica 0", timeout=10.0)
        assert "(pid 102 on node 127.0.0.1) died" in event and "as pid 203" in event
        log.write(snapshot)
        rows = read_rows(tmp_path / "run.csv")
        assert [(r["stage1r0_pid"], r["stage1r0_restarts"]) for r in rows] == [
            ("102", "0"), ("203", "1"),
        ]  # fmt: skip
        assert rows[-1]["stage0r0_rss_mib"] == "200.0" and event in rows[-1]["event"]
        assert json.loads(snapshot_to_line(snapshot))["run"]["workers"][1]["pid"] == 203
    finally:
        if log is not None:
            log.close()
        monitor.close()
        server.close()


def test_a_stopped_run_is_posted_stalled_then_running_again():
    # One process in the table: the run's is there only because the Monitor names it each tick.
    monitor = Monitor(SystemSource(top_n=1), HostedRun(["--preset", "tiny"]), interval=0.2)
    try:
        assert monitor.runtime.wait_ready(120)
        _, snapshot = tick_until_event(monitor, "run running (pid", 60)
        pid = snapshot.run.pid
        assert [p.pid for p in snapshot.processes if p.is_run] == [pid]
        assert snapshot.run.rss and snapshot.run.cpu_percent is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            event, snapshot = tick_until_event(monitor, "run stalled", STALL_MIN_S + 30)
        finally:
            continue_pid(pid)
        match = re.fullmatch(rf"run stalled: no report for (\d+) s \(pid {pid}\)", event)
        assert match and int(match[1]) >= STALL_MIN_S, event
        assert snapshot.run.state == "stalled" and snapshot.run.tokens_per_s is None
        schema = json.loads((Path(__file__).parent / "snapshot_schema.json").read_text())
        jsonschema.validate(json.loads(snapshot_to_line(snapshot)), schema)  # --json's schema
        _, snapshot = tick_until_event(monitor, "run running again", 30)
        assert snapshot.run.state == "running"
    finally:
        monitor.close()


def test_headless_logs_a_stopped_run_as_stalled_and_quits_it_within_seconds(
    tmp_path, xltop_process
):
    path = tmp_path / "run.csv"
    proc = xltop_process("--headless", "--preset", "tiny", "--csv", str(path),
                         "--interval", "0.2")  # fmt: skip
    wait_for_rows(path, 3, proc)
    run_pid = int(read_rows(path)[0]["run_pid"])
    try:
        os.kill(run_pid, signal.SIGSTOP)
        stalled = wait_for_row(path, lambda r: r["run_state"] == "stalled", STALL_MIN_S + 30)
        assert stalled["event"].startswith("run stalled: no report for")
        assert stalled["tokens_per_s"] == ""  # no step completes: no throughput
        os.kill(run_pid, signal.SIGCONT)
        wait_for_row(path, lambda r: "run running again" in r["event"], 30)
        os.kill(run_pid, signal.SIGSTOP)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # Stopped, the run acted on nothing: xltop took ~18 s and killed it.
        assert time.monotonic() - start < 8
        assert process_gone(run_pid)
    finally:
        continue_pid(run_pid)
    _, stderr = proc.communicate()
    assert "xltop: run stalled: no report for" in stderr


def wait_for_row(path, predicate, timeout: float) -> dict[str, str]:
    """The first row of the CSV at `path` that `predicate` accepts, once there is one."""
    return wait_until(
        lambda: next((r for r in read_rows(path)[:-1] if predicate(r)), None),
        timeout,
        f"such a row in {path}",
        interval=0.1,
    )


def test_a_hello_with_an_absurd_block_count_lays_out_no_blocks(tmp_path):
    # The layout before the first report comes from the hello's config, which is the peer's
    # word: a count no report could carry, or not an integer, must not allocate or raise.
    for num_blocks in (10**12, 2.5, "3", True, -4):
        hello = dataclasses.replace(HELLO, config={"num_blocks": num_blocks})
        server = ChannelServer(str(tmp_path / "run.sock"), hello)
        source = AttachedRun(server.path)
        try:
            info = source.sample()
            assert info.state == RunState.STARTING
            assert info.blocks == () and info.layers == (), num_blocks
        finally:
            source.close()
            server.close()
    server = ChannelServer(
        str(tmp_path / "run.sock"), dataclasses.replace(HELLO, config={"num_blocks": 3})
    )
    source = AttachedRun(server.path)
    try:
        assert len(source.sample().blocks) == 3  # a real run's count is believed
    finally:
        source.close()
        server.close()


def test_a_ray_run_whose_cluster_cannot_be_watched_is_watched_without_it(tmp_path, monkeypatch):
    # The run's hello names its dashboard; RAY_AUTH_TOKEN_PATH names a file that is no token
    # file: every tick failed on it (the screen stopped), now the run is shown, the reason once.
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(fifo))
    hello = dataclasses.replace(HELLO, ray_dashboard="http://127.0.0.1:8265")
    server = ChannelServer(str(tmp_path / "run.sock"), hello)
    args = build_parser().parse_args(["--attach", server.path])
    watch = _cluster_for(args, 0.2)
    monitor = Monitor(SystemSource(top_n=1), AttachedRun(server.path), interval=0.2,
                      cluster_for=watch)  # fmt: skip
    try:
        server.publish(telemetry(5))
        wait_until(lambda: monitor.runtime.sample().step == 5, what="the report")
        events = [event for _ in range(3) for event in monitor.tick().events]
        refused = [e for e in events if e.startswith("cannot watch the run's Ray cluster")]
        assert len(refused) == 1 and "not a regular file" in refused[0], events
        assert monitor.tick().run.step == 5
    finally:
        monitor.close()
        server.close()
