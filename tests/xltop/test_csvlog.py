"""The CSV sink: schema, append rules, torn rows, full disks, files not ours, signals."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xltop_helpers import REPO, read_rows, run_xltop, wait_for_rows, xltop_env

from ttt_runtime.protocol import BlockTiming, LayerFigures
from xltop.csvlog import CsvLog, CsvLogError, CsvSink, csv_columns, snapshot_to_row
from xltop.monitor import Monitor
from xltop.snapshot import MlxMemory, RunInfo, RunState, Snapshot
from xltop.sources import SystemSource


@pytest.fixture(scope="module")
def machine_snapshot() -> Snapshot:
    return Monitor(SystemSource(top_n=5), interval=0.2).tick()


def with_run(snapshot: Snapshot, n_blocks: int) -> Snapshot:
    """The machine snapshot plus a run of n_blocks blocks (plain data, as telemetry gives)."""
    run = RunInfo(
        state=RunState.RUNNING,
        pid=1,
        mode="adapt",
        preset="tiny",
        rss=300 << 20,
        step=7,
        tokens=7 * 64,
        loss_bpb=3.25,
        blocks=tuple(BlockTiming(fwd_ms=1.5 + i, bwd_ms=None) for i in range(n_blocks)),
        layers=tuple(LayerFigures(2.0, 0.1, 0.01, 1.0, 0.5) for _ in range(n_blocks)),
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


def run_xltop_with_file_limit(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`python -m xltop ARGS` whose files cannot grow past `limit` bytes, as on a disk that
    fills: a write that crosses it is cut short, the next fails with EFBIG (Python ignores
    SIGXFSZ)."""
    return subprocess.run(
        [sys.executable, "-m", "xltop", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=xltop_env(),
        cwd=REPO,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )


def test_a_full_disk_leaves_whole_rows_only_and_says_so_once(tmp_path):
    path = tmp_path / "log.csv"
    limit = 500  # the header and a few rows of about 60 bytes: the limit falls inside a row
    result = run_xltop_with_file_limit(limit, "--headless", "--no-run", "--csv", str(path),
                                       "--count", "8", "--interval", "0.2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "CSV logging to" in line]
    assert len(said) == 1 and "stopped: File too large; monitoring goes on" in said[0], said
    assert sum("mem " in line for line in result.stderr.splitlines()) == 8  # monitoring went on
    data = path.read_bytes()
    assert 0 < len(data) <= limit and data.endswith(b"\n")  # the limit may fall after a row
    header, *rows = list(csv.reader(io.StringIO(data.decode())))
    assert header == csv_columns(0, 0) and rows
    assert all(len(row) == len(header) and float(row[0]) > 0 for row in rows)


def test_a_failed_first_row_leaves_an_empty_file_to_log_to_later(tmp_path):
    path = tmp_path / "log.csv"
    result = run_xltop_with_file_limit(100, "--headless", "--no-run", "--csv", str(path),
                                       "--count", "2", "--interval", "0.2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("CSV logging to") == 1
    assert path.read_bytes() == b""  # the header was cut back with its row


def test_the_sink_opens_on_the_first_snapshot_and_stops_at_a_failure_said_once(
    tmp_path, machine_snapshot
):
    # The one policy the headless modes and the TUI share.
    said: list[str] = []
    folder = tmp_path / "later"
    sink = CsvSink(folder / "log.csv", on_error=said.append)
    assert sink.active and not folder.exists()
    for _ in range(3):
        sink.write(machine_snapshot)
    assert said == [f"cannot log to {folder / 'log.csv'}: folder {folder} does not exist; "
                    "monitoring goes on"]  # fmt: skip
    assert not sink.active and sink.stop() is None  # stopped: nothing was open

    folder.mkdir()
    sink.start()  # the same path again, from the next snapshot
    assert sink.active and not (folder / "log.csv").exists()
    sink.write(machine_snapshot)
    sink.write(machine_snapshot)
    assert sink.stop() == str(folder / "log.csv") and not sink.active
    sink.write(machine_snapshot)  # stopped: no row
    assert len(read_rows(folder / "log.csv")) == 2 and len(said) == 1
    assert not CsvSink(None, on_error=said.append).active


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


def header_of(n_blocks: int, n_layers: int) -> bytes:
    return (",".join(csv_columns(n_blocks, n_layers)) + "\n").encode()


OLD_MTIME_NS = 1_000_000_000 * 10**9  # set on a file first, so that any write would show

FOREIGN_FILES = {
    "one line, no newline": b"my notes",
    "a CSV with a torn last line": b"name,value\nalpha,1\nbeta,2",
    "binary junk": bytes(range(256)) * 8,
    "only a newline": b"\n",
    # Half of our header (xltop killed while writing its first row) does not prove the file is
    # ours: refused like any other, the user deletes it.
    "a partial xltop header": header_of(0, 0)[:40],
    "an xltop header of another run, torn row": header_of(2, 2) + b"1795400782.9,0.2,24",
}


def foreign_file(tmp_path, content: bytes):
    path = tmp_path / "notes.csv"
    path.write_bytes(content)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return path


def assert_untouched(path, content: bytes) -> None:
    assert path.read_bytes() == content
    assert path.stat().st_mtime_ns == OLD_MTIME_NS


@pytest.mark.parametrize("content", FOREIGN_FILES.values(), ids=FOREIGN_FILES.keys())
def test_a_file_that_is_not_ours_is_never_modified(tmp_path, machine_snapshot, content):
    path = foreign_file(tmp_path, content)
    with pytest.raises(CsvLogError, match=f"{path}.*log to a new file"):
        CsvLog.open(path, machine_snapshot)
    assert_untouched(path, content)


@pytest.mark.parametrize("content", [b"my notes", b"name,value\nalpha,1\nbeta,2"])
def test_the_cli_refuses_a_file_that_is_not_ours_before_starting(tmp_path, content):
    path = foreign_file(tmp_path, content)
    result = run_xltop("--no-run", "--headless", "--count", "3", "--csv", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not an xltop CSV log" in result.stderr
    assert_untouched(path, content)


@pytest.mark.parametrize("kind", ["fifo", "symlink to a fifo", "character device"])
def test_a_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    path = tmp_path / "log.csv"
    if kind == "character device":
        path = "/dev/null"  # would swallow every row
    else:
        os.mkfifo(tmp_path / "fifo")  # opening it to write would wait for a reader forever
        if kind == "fifo":
            path = tmp_path / "fifo"
        else:
            path.symlink_to(tmp_path / "fifo")
    result = run_xltop("--no-run", "--json", "--csv", str(path), timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"xltop: cannot log to {path}: not a regular file\n"


def test_a_regular_file_that_cannot_be_read_back_is_refused():
    """/proc/self/mem passes for a regular file but reading it fails: one line, exit 2."""
    result = run_xltop("--no-run", "--json", "--csv", "/proc/self/mem", timeout=60)
    assert result.returncode == 2
    assert result.stderr == "xltop: cannot log to /proc/self/mem: Input/output error\n"


def test_a_symlink_to_our_log_is_followed(tmp_path, machine_snapshot):
    target = tmp_path / "log.csv"
    link = tmp_path / "current.csv"
    link.symlink_to(target)
    for _ in range(2):
        log = CsvLog.open(link, machine_snapshot)
        log.write(machine_snapshot)
        log.close()
    assert link.is_symlink() and len(read_rows(target)) == 2


# -- the reopen path, fuzzed ------------------------------------------------------------------

N_COLUMNS = len(csv_columns(0, 0))  # machine_snapshot has no run
cells = st.one_of(
    st.just(""),
    st.floats(allow_nan=False).map(repr),
    st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",))),
)
whole_rows = st.lists(st.lists(cells, min_size=N_COLUMNS, max_size=N_COLUMNS), max_size=5).map(
    lambda rows: "".join(csv_line(row) for row in rows).encode()
)
torn_tails = st.binary(max_size=80).filter(lambda tail: b"\n" not in tail)
ours = st.tuples(whole_rows, torn_tails).map(lambda parts: (header_of(0, 0) + parts[0], parts[1]))
foreign = st.one_of(
    st.binary(min_size=1),
    st.text(min_size=1).map(str.encode),
    st.sampled_from(list(FOREIGN_FILES.values())),
    st.integers(1, len(header_of(0, 0)) - 1).map(lambda n: header_of(0, 0)[:n]),
).filter(lambda content: not content.startswith(header_of(0, 0)))


def csv_line(row: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(file=st.one_of(ours, foreign.map(lambda content: (None, content))), n_new=st.integers(0, 3))
def test_reopening_keeps_whole_rows_and_never_touches_a_foreign_file(
    tmp_path, machine_snapshot, file, n_new
):
    whole, rest = file  # ours: (header and whole rows, a torn tail); foreign: (None, content)
    path = foreign_file(tmp_path, (whole or b"") + rest)
    if whole is None:
        with pytest.raises(CsvLogError):
            CsvLog.open(path, machine_snapshot)
        assert_untouched(path, rest)
        return
    log = CsvLog.open(path, machine_snapshot)
    for _ in range(n_new):
        log.write(machine_snapshot)
    log.close()
    data = path.read_bytes()
    assert data.startswith(whole) and data.endswith(b"\n")  # only the torn tail went
    header, *rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert header == csv_columns(0, 0)
    assert all(len(row) == N_COLUMNS for row in rows)
    added = list(csv.reader(io.StringIO(data[len(whole) :].decode(), newline="")))
    assert len(added) == n_new and all(float(row[0]) > 0 for row in added)


def test_every_row_is_one_line_whatever_its_strings_hold(tmp_path, machine_snapshot):
    # A run's error (often several lines) in a row's event: were a row to span lines,
    # a tear after its inner newline would pass for a whole row, and its open quote would then
    # swallow every row appended after it. Control characters are written as escapes.
    snapshot = with_run(machine_snapshot, 2)
    snapshot = dataclasses.replace(snapshot, events=("run stopped: a\nb\r \x1b[2J",))
    path = tmp_path / "log.csv"
    log = CsvLog.open(path, snapshot)
    for _ in range(3):
        log.write(snapshot)
    log.close()
    assert len(path.read_bytes().splitlines()) == 4  # the header and three rows
    rows = read_rows(path)
    assert rows[0]["event"] == "run stopped: a\\nb\\r \\x1b[2J"
