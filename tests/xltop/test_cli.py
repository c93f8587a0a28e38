"""The `xltop` command line, run as a real child process."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import jsonschema
import pytest
from conftest import run_xltop

SCHEMA = json.loads((Path(__file__).parent / "snapshot_schema.json").read_text())


def test_once_prints_one_table_and_exits_0():
    result = run_xltop("--once", "--no-run")
    assert result.returncode == 0, result.stderr
    assert "Mem:" in result.stdout and "total" in result.stdout
    header = next(line for line in result.stdout.splitlines() if "PID" in line)
    assert header.split()[:4] == ["PID", "USER", "RSS_MIB", "CPU%"]


def test_plain_xltop_without_a_terminal_behaves_like_once():
    result = run_xltop("--no-run")
    assert result.returncode == 0, result.stderr
    assert "not a terminal" in result.stderr
    assert "Mem:" in result.stdout and "PID" in result.stdout


def test_json_is_one_valid_snapshot():
    result = run_xltop("--json", "--no-run")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    jsonschema.validate(snapshot, SCHEMA)
    assert snapshot["system"]["total"] > 0 and snapshot["processes"]
    assert snapshot["run"] is None


def test_json_stream_gives_one_valid_line_per_tick():
    result = run_xltop("--json-stream", "--no-run", "--count", "3", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    snapshots = [json.loads(line) for line in lines]
    for snapshot in snapshots:
        jsonschema.validate(snapshot, SCHEMA)
    times = [s["time"] for s in snapshots]
    assert times == sorted(times) and times[2] - times[0] >= 0.3


def test_headless_duration_stops_on_time():
    result = run_xltop("--headless", "--no-run", "--duration", "1", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    assert 3 <= sum(" mem " in line for line in result.stderr.splitlines()) <= 5


def test_poll_is_the_old_monitors_headless_flag():
    result = run_xltop("--poll", "0.2", "--no-run", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert sum(" mem " in line for line in result.stderr.splitlines()) == 2


def test_quiet_headless_prints_nothing(tmp_path):
    path = tmp_path / "q.csv"
    result = run_xltop("--headless", "--quiet", "--no-run", "--csv", str(path), "--count", "2",
                       "--interval", "0.2")  # fmt: skip
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""
    assert path.read_text().count("\n") == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bogus"], "--bogus"),
        (["--interval", "0.05"], "--interval"),
        (["--interval", "abc"], "--interval"),
        (["--count", "0"], "--count"),
        (["--count", "2", "--duration", "1"], "--duration"),
        (["--once", "--json"], "--json"),
        (["--mem-soft", "150%"], "--mem-soft"),
        (["--mem-soft", "lots"], "--mem-soft"),
        (["--mem-soft", "2GiB", "--mem-hard", "1GiB"], "--mem-soft"),
        (["--no-run", "--mem-hard", "50%"], "--no-run"),
        (["--no-run", "--preset", "tiny"], "--preset"),
        (["--no-run", "--attach", "/tmp/x.sock"], "--attach"),
        (["--mode", "sideways"], "--mode"),
        (["--attach", "/nonexistent/run.sock"], "/nonexistent/run.sock"),
        (["--csv", "/nonexistent/dir/log.csv", "--no-run"], "/nonexistent/dir"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, needle):
    result = run_xltop(*args, "--once")
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_attach_to_a_dead_socket_fails_fast(tmp_path):
    path = tmp_path / "dead.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))  # bound, never listening: the path exists, nobody answers
    try:
        start = time.monotonic()
        result = run_xltop("--attach", str(path), "--once")
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert result.returncode == 1
    assert str(path) in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 15  # the CLI's own 5 s bound plus interpreter start on a loaded machine
