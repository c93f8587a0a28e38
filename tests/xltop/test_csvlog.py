"""The CSV sink: schema, append rules, torn rows, full disks, signals."""

from __future__ import annotations

import signal
import time

import pytest
from xltop_helpers import read_rows, run_xltop, wait_for_rows

from xltop.csvlog import CsvLog, CsvLogError, csv_columns, snapshot_to_row
from xltop.monitor import Monitor
from xltop.snapshot import BlockStats, LayerStats, MlxMemory, RunInfo, Snapshot
from xltop.sources import SystemSource


@pytest.fixture(scope="module")
def machine_snapshot() -> Snapshot:
    return Monitor(SystemSource(top_n=5), interval=0.2).tick()


def with_run(snapshot: Snapshot, n_blocks: int) -> Snapshot:
    """The machine snapshot plus a run of n_blocks blocks (plain data, as telemetry gives)."""
    run = RunInfo(
        state="running",
        pid=1,
        mode="adapt",
        preset="tiny",
        rss=300 << 20,
        step=7,
        tokens=7 * 64,
        loss_bpb=3.25,
        blocks=tuple(BlockStats(fwd_ms=1.5 + i, bwd_ms=None) for i in range(n_blocks)),
        layers=tuple(LayerStats(2.0, 0.1, 0.01, 1.0, 0.5) for _ in range(n_blocks)),
        mlx=MlxMemory(active=10 << 20, cache=2 << 20, peak=12 << 20, limit=1 << 34,
                      backend="cpu", device="cpu"),
    )  # fmt: skip
    return Snapshot(time=snapshot.time, interval=1.0, system=snapshot.system, run=run,
                    events=("watchdog: something",))  # fmt: skip


def test_columns_carry_units_and_one_per_block_and_layer():
    columns = csv_columns(2, 2)
    for name in (
        "ts",
        "rss_mib",
        "avail_mib",
        "total_mib",
        "mlx_active_mib",
        "mlx_cache_mib",
        "block0_fwd_ms",
        "block1_bwd_ms",
        "layer0_w_norm",
        "layer1_drift",
        "event",
    ):
        assert name in columns  # fmt: skip
    assert len(columns) == len(set(columns))


def test_rows_round_trip_through_the_csv_module(tmp_path, machine_snapshot):
    path = tmp_path / "log.csv"
    log = CsvLog.open(path, with_run(machine_snapshot, 2))
    for _ in range(3):
        log.write(with_run(machine_snapshot, 2))
    log.close()
    rows = read_rows(path)
    assert len(rows) == 3
    row = rows[0]
    assert float(row["rss_mib"]) == 300.0
    assert float(row["mlx_active_mib"]) == 10.0
    assert float(row["block1_fwd_ms"]) == 2.5
    assert row["block0_bwd_ms"] == ""
    assert float(row["total_mib"]) > 0 and int(row["step"]) == 7
    assert row["event"] == "watchdog: something"
    assert path.read_text().count("ts,") == 1


def test_append_with_same_header_adds_rows_only(tmp_path, machine_snapshot):
    path = tmp_path / "log.csv"
    for _ in range(2):
        log = CsvLog.open(path, machine_snapshot)
        log.write(machine_snapshot)
        log.close()
    assert len(read_rows(path)) == 2


def test_append_with_other_header_is_refused(tmp_path, machine_snapshot):
    path = tmp_path / "log.csv"
    log = CsvLog.open(path, with_run(machine_snapshot, 2))
    log.write(with_run(machine_snapshot, 2))
    log.close()
    before = path.read_bytes()
    with pytest.raises(CsvLogError, match="other columns"):
        CsvLog.open(path, with_run(machine_snapshot, 3))
    assert path.read_bytes() == before


def test_a_torn_last_row_is_dropped_before_appending(tmp_path, machine_snapshot):
    path = tmp_path / "log.csv"
    log = CsvLog.open(path, machine_snapshot)
    log.write(machine_snapshot)
    log.close()
    with open(path, "a") as f:
        f.write("1795400782.9,0.2,240")  # what a SIGKILL mid-write could leave
    log = CsvLog.open(path, machine_snapshot)
    log.write(machine_snapshot)
    log.close()
    rows = read_rows(path)
    assert len(rows) == 2 and all(float(r["total_mib"]) > 0 for r in rows)


@pytest.mark.parametrize("where", ["missing-folder", "directory"])
def test_unusable_paths_fail_clearly(tmp_path, machine_snapshot, where):
    path = tmp_path / "nope" / "log.csv" if where == "missing-folder" else tmp_path
    with pytest.raises(CsvLogError, match=str(path)):
        CsvLog.open(path, machine_snapshot)


def test_full_disk_stops_the_log_with_a_clear_error(machine_snapshot):
    log = CsvLog.open("/dev/full", machine_snapshot)  # every write: ENOSPC
    with pytest.raises(CsvLogError, match="stopped"):
        log.write(machine_snapshot)
    assert log.closed


def test_full_disk_keeps_the_headless_monitor_going():
    result = run_xltop("--headless", "--no-run", "--csv", "/dev/full", "--count", "3",
                       "--interval", "0.2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "stopped" in result.stderr and "monitoring goes on" in result.stderr
    assert sum("mem " in line for line in result.stderr.splitlines()) == 3


def test_snapshot_to_row_leaves_run_columns_empty_without_a_run(machine_snapshot):
    row = snapshot_to_row(machine_snapshot, 0, 0)
    assert row["run_state"] is None and row["total_mib"] > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signals_leave_a_parseable_file(tmp_path, xltop_process, sig):
    path = tmp_path / "log.csv"
    proc = xltop_process("--headless", "--no-run", "--csv", str(path), "--interval", "0.2")
    wait_for_rows(path, 3, proc)
    proc.send_signal(sig)
    proc.wait(30)
    if sig != signal.SIGKILL:
        assert proc.returncode == 0
    time.sleep(0.1)
    rows = read_rows(path)
    assert len(rows) >= 3
    assert all(float(r["total_mib"]) > 0 and float(r["ts"]) > 0 for r in rows)
    assert path.read_text().endswith("\n")
