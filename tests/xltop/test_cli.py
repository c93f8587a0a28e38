"""The `xltop` command line, run as a real child process."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from fake_source import fake_snapshot
from messages import HELLO, telemetry
from polling import wait_until
from xltop_helpers import (
    REPO,
    kill_pid,
    process_gone,
    read_rows,
    run_xltop,
    wait_for_rows,
    xltop_env,
)

from ttt_runtime.channel import ChannelServer
from ttt_runtime.protocol import BlockTiming, ErrorReport, LayerFigures
from xltop.jsonout import snapshot_to_line
from xltop.snapshot import RunState
from xltop.table import format_snapshot, status_line

SCHEMA = json.loads((Path(__file__).parent / "snapshot_schema.json").read_text())


def test_once_prints_one_table_and_exits_0():
    result = run_xltop("--once", "--no-run")
    assert result.returncode == 0, result.stderr
    assert "Mem:" in result.stdout and "total" in result.stdout
    header = next(line for line in result.stdout.splitlines() if "PID" in line)
    assert header.split()[:4] == ["PID", "USER", "RSS_MIB", "CPU%"]


def test_the_table_and_status_line_write_sizes_as_the_tui_does():
    snapshot = fake_snapshot(0)  # 24 GiB of memory, 12 GiB used, a run of 900 MiB RSS
    assert "Mem: 24 GiB total  12 GiB used  11 GiB available" in format_snapshot(snapshot)
    assert " mem 12 GiB/24 GiB " in status_line(snapshot)
    assert " rss 900 MiB " in status_line(snapshot)


def test_the_once_table_has_a_column_per_block_and_layer_figure():
    lines = format_snapshot(fake_snapshot(3)).splitlines()
    header = lines.index("per block (sampled step 30):") + 1
    assert lines[header].split() == [
        "BLOCK", "FWD_MS", "BWD_MS", "W_NORM", "UPDATE_NORM", "DRIFT", "INNER_LOSS_BEFORE",
        "INNER_LOSS_AFTER", "EXACT_DRIFT",
    ]  # fmt: skip
    assert lines[header + 1].split() == ["0", "2.30", "4.00", "10", "0.0385", "0.003", "0.87",
                                         "0.696", "-"]  # fmt: skip


def test_json_writes_a_diverged_figure_as_null_wherever_it_sits():
    snapshot = fake_snapshot(3)
    layers = (dataclasses.replace(snapshot.run.layers[0], drift=math.nan),)
    snapshot = dataclasses.replace(snapshot, run=dataclasses.replace(snapshot.run, layers=layers))
    data = json.loads(snapshot_to_line(snapshot))
    jsonschema.validate(data, SCHEMA)
    assert data["run"]["layers"][0]["drift"] is None


def test_the_json_schema_names_every_run_state_and_every_figure():
    schema = SCHEMA["$defs"]  # the published contract follows the one definition of each
    assert schema["run"]["properties"]["state"]["enum"] == [state.value for state in RunState]
    assert schema["block"]["required"] == [f.name for f in dataclasses.fields(BlockTiming)]
    assert schema["layer"]["required"] == [f.name for f in dataclasses.fields(LayerFigures)]


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


def test_a_run_on_the_bundled_blas_gets_one_hint_to_install_openblas():
    result = run_xltop("--json-stream", "--preset", "tiny", "--no-blas-preload",
                       "--count", "3", "--interval", "0.2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    snapshots = [json.loads(line) for line in result.stdout.splitlines()]
    assert {s["run"]["blas"] for s in snapshots} == {"bundled"}
    events = [e for s in snapshots for e in s["events"]]
    assert sum("libopenblas0-pthread" in e for e in events) == 1


def test_the_runs_warm_up_is_one_event():
    result = run_xltop("--json-stream", "--preset", "tiny", "--count", "3", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    snapshots = [json.loads(line) for line in result.stdout.splitlines()]
    warmup_ms = snapshots[0]["run"]["warmup_ms"]
    assert warmup_ms > 0 and {s["run"]["warmup_ms"] for s in snapshots} == {warmup_ms}
    events = [e for s in snapshots for e in s["events"] if "warm-up" in e]
    assert events == [f"run's first step (compile/warm-up) took {warmup_ms:.0f} ms"]


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
        (["--attach", "/etc/passwd"], "--attach /etc/passwd: not a socket"),
        (["--csv", "/nonexistent/dir/log.csv", "--no-run"], "/nonexistent/dir"),
        (["--csv", "", "--no-run"], "cannot log to '': the path is empty"),
        # numbers: a range each, and NaN or an infinity is outside every range
        (["--no-run", "--interval", "1e10"], "'1e10' must be between 0.2 and 86400 seconds"),
        (["--no-run", "--interval", "inf"], "--interval: 'inf' must be between"),
        (["--no-run", "--interval", "nan"], "--interval: 'nan' must be between"),
        (["--no-run", "--poll", "nan"], "--poll: 'nan' must be between"),
        (["--no-run", "--duration", "nan"], "--duration: 'nan' must be between"),
        (["--no-run", "--duration", "inf"], "--duration: 'inf' must be between"),
        (["--no-run", "--count", "1.5"], "--count: '1.5' is not an integer"),
        (["--no-run", "--top", "0"], "--top: '0' must be between 1 and"),
        (["--mem-soft", "9" * 400], "--mem-soft"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, needle):
    assert_one_line_usage_error(run_xltop(*args, "--once", timeout=30), needle)


def test_bad_run_inputs_exit_2_before_a_run_starts(unusable_run_inputs):
    for args, needle in unusable_run_inputs:
        # the timeout: opening a FIFO for reading would hang, reading /dev/zero never ends
        assert_one_line_usage_error(run_xltop(*args, "--once", timeout=30), needle)


def assert_one_line_usage_error(result, needle):
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result


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


# -- with a hosted or attached run (the tiny preset: steps of a few milliseconds) --------------


def test_headless_with_a_hosted_run_logs_sane_rows(tmp_path):
    path = tmp_path / "run.csv"
    result = run_xltop("--headless", "--preset", "tiny", "--csv", str(path), "--count", "6",
                       "--interval", "0.3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = read_rows(path)
    assert len(rows) == 6
    assert all(r["run_state"] == "running" for r in rows)
    assert all(float(r["rss_mib"]) > 0 and float(r["total_mib"]) > 0 for r in rows)
    assert all(float(r["mlx_active_mib"]) > 0 for r in rows)
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    assert rows[-1]["block1_fwd_ms"] and float(rows[-1]["block1_fwd_ms"]) > 0
    assert rows[-1]["layer1_w_norm"] and float(rows[-1]["layer1_w_norm"]) > 0
    assert "run running" in result.stderr
    run_pid = int(rows[0]["run_pid"])
    assert process_gone(run_pid)


def test_json_with_a_hosted_run_validates():
    result = run_xltop("--json", "--preset", "tiny", "--mode", "adapt")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    jsonschema.validate(snapshot, SCHEMA)
    run = snapshot["run"]
    assert run["state"] == "running" and run["mode"] == "adapt" and run["preset"] == "tiny"
    assert run["step"] >= 1 and run["rss"] > 0 and run["mlx"]["active"] > 0
    assert any(p["is_run"] and p["pid"] == run["pid"] for p in snapshot["processes"])


def ctrl_c(proc):
    """What a terminal's Ctrl-C does: SIGINT to the whole foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)


@pytest.mark.parametrize(
    "send",
    [lambda p: p.send_signal(signal.SIGINT), lambda p: p.send_signal(signal.SIGTERM), ctrl_c],
    ids=["SIGINT", "SIGTERM", "ctrl-c"],
)
def test_signals_close_the_log_and_stop_the_hosted_run(tmp_path, xltop_process, send):
    path = tmp_path / "run.csv"
    proc = xltop_process("--headless", "--preset", "tiny", "--csv", str(path),
                         "--interval", "0.2")  # fmt: skip
    wait_for_rows(path, 3, proc)
    run_pid = int(read_rows(path)[0]["run_pid"])
    send(proc)
    assert proc.wait(30) == 0
    rows = read_rows(path)
    assert len(rows) >= 3 and path.read_text().endswith("\n")
    assert all(r["run_state"] == "running" for r in rows)
    assert process_gone(run_pid)


def _tui_in_a_terminal_until_sigterm(delay: float) -> tuple[int, bytes]:
    """Start the TUI (`--no-run`) on a real pseudo-terminal, SIGTERM it after `delay` s, and
    return its exit code and everything it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "xltop", "--no-run"], stdin=slave,
                            stdout=slave, stderr=slave, env=dict(xltop_env(), TERM="xterm"),
                            cwd=REPO, start_new_session=True)  # fmt: skip
    os.close(slave)
    output, start = b"", time.monotonic()
    try:
        while time.monotonic() - start < 60:
            if delay is not None and time.monotonic() - start > delay:
                proc.send_signal(signal.SIGTERM)
                delay = None
            if select.select([master], [], [], 0.05)[0]:
                try:
                    output += os.read(master, 65536)
                except OSError:  # the terminal's other end is gone: xltop has exited
                    break
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), output


def test_sigterm_while_the_tui_starts_quits_as_q_does():
    """SIGTERM at any moment of the TUI's start (mid-mount included) exits 0 without a
    traceback: before, a SIGTERM while Textual imported or mounted printed a traceback."""
    for delay in (0.3, 0.5, 0.7, 0.9, 1.2, 1.6, 2.0):
        code, output = _tui_in_a_terminal_until_sigterm(delay)
        assert code == 0 and b"Traceback" not in output, (delay, output[-2000:])


def test_sigkill_leaves_a_parseable_file(tmp_path, xltop_process):
    path = tmp_path / "run.csv"
    proc = xltop_process("--headless", "--preset", "tiny", "--csv", str(path),
                         "--interval", "0.2")  # fmt: skip
    wait_for_rows(path, 3, proc)
    proc.kill()
    proc.wait(30)
    rows = read_rows(path)
    assert len(rows) >= 3 and all(int(r["step"]) >= 0 for r in rows)
    # the run's lifeline (its stdin) broke with xltop: it stops, removing its socket's folder
    run_pid = int(rows[0]["run_pid"])
    deadline = time.monotonic() + 30
    while not process_gone(run_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not process_gone(run_pid):
        kill_pid(run_pid)  # a test never leaves a run behind
        raise AssertionError("the run outlived its SIGKILLed monitor by 30 s")


def test_attach_watches_a_run_started_elsewhere(tiny_run):
    run = tiny_run()
    result = run_xltop("--attach", run.socket_path, "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    jsonschema.validate(snapshot, SCHEMA)
    assert snapshot["run"]["pid"] == run.pid and snapshot["run"]["state"] == "running"
    assert run.poll() is None  # detaching never stops a run xltop did not start


def test_bad_run_values_exit_2_before_starting():
    result = run_xltop("--preset", "enormous", "--once")
    assert result.returncode == 2
    assert "enormous" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_run_that_dies_at_start_is_a_clear_error(tmp_path):
    from ttt_runtime.stream import CHECK_FILES

    # xltop's check sniffs a bounded number of files and leaves a bigger folder to the run
    for n in range(CHECK_FILES + 1):
        (tmp_path / f"{n:05}.bin").write_bytes(b"\0binary")
    result = run_xltop("--once", "--preset", "tiny", "--data", str(tmp_path))
    assert result.returncode == 1
    assert f"the run stopped (exit code 2): ttt-run: error: data path {tmp_path} holds no" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_resume_checkpoint_with_bad_metadata_exits_2_before_starting(tmp_path):
    from ttt_runtime.config import CHECKPOINT_FORMAT

    # a crafted header: xltop reads only the header (no MLX) before it starts a run
    header = json.dumps({"__metadata__": {"format": CHECKPOINT_FORMAT, "config": "[1]"}})
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode())
    result = run_xltop("--once", "--resume", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "config" in lines[0]
    assert result.stdout == ""


# terminal escapes (retitle, clear the screen) where xltop prints text that is not its own
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J"


def test_text_output_writes_control_characters_as_escapes_never_raw(tmp_path, children):
    victim = children("sh", "-c", "sleep 300; :", HOSTILE)  # short: the table cuts commands
    once = run_xltop("--once", "--no-run", "--top", "1000000")
    row = next(line for line in once.stdout.splitlines() if line.split()[:1] == [str(victim.pid)])
    assert "\x1b" not in once.stdout and "\x07" not in once.stdout
    assert row.endswith("\\x1b]0;PWNED\\x07\\x1b[2J")
    # headless: an attached run's error, the run's own words, is an event on stderr
    server = ChannelServer(str(tmp_path / "run.sock"), HELLO)
    xltop = subprocess.Popen(
        [sys.executable, "-m", "xltop", "--attach", server.path, "--headless", "--interval",
         "0.2", "--duration", "6"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=xltop_env(), cwd=REPO, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: server._peers, what="xltop to attach")
        server.publish(telemetry(1))
        server.publish(ErrorReport("RuntimeError", f"bad {HOSTILE} day", "tb"))
        server.close()
        _, stderr = xltop.communicate(timeout=60)
    finally:
        kill_pid(xltop.pid)
        server.close()
    assert "run stopped" in stderr and "\x1b" not in stderr
    assert "RuntimeError: bad \\x1b]0;PWNED\\x07\\x1b[2J day" in stderr


def xltop_with(redirect: str, *args: str) -> subprocess.CompletedProcess:
    """`xltop ARGS` started by a shell with `redirect` (e.g. 2>&- closes its stderr)."""
    command = f'exec "$@" {redirect}'
    return subprocess.run(
        ["sh", "-c", command, "sh", sys.executable, "-m", "xltop", *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env=xltop_env(), cwd=REPO,
    )  # fmt: skip


def test_a_closed_or_broken_stderr_never_stops_headless_logging(tmp_path):
    logging = ("--no-run", "--headless", "--interval", "0.2", "--count", "8", "--csv")
    # closed: nothing said goes to stdout in its place
    closed = xltop_with("2>&-", *logging, str(tmp_path / "closed.csv"))
    assert closed.returncode == 0 and closed.stdout == ""
    assert len(read_rows(tmp_path / "closed.csv")) == 8
    # broken: its reader went away after the first line
    reader = "head -c 1 >/dev/null"
    broken = xltop_with(f"2>&1 >/dev/null | {reader}", *logging, str(tmp_path / "broken.csv"))
    assert broken.returncode == 0
    assert len(read_rows(tmp_path / "broken.csv")) == 8


@pytest.mark.parametrize("mode", ["--once", "--json", "--json-stream", None])
def test_a_closed_stdout_is_one_line_and_exit_2(mode):
    result = xltop_with(">&-", "--no-run", *([mode] if mode else []))
    assert result.returncode == 2
    assert result.stderr.startswith("xltop: ") and "stdout is closed" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_headless_logs_with_stdout_closed(tmp_path):
    args = ("--no-run", "--headless", "--interval", "0.2", "--count", "3", "--csv")
    result = xltop_with(">&-", *args, str(tmp_path / "log.csv"))
    assert result.returncode == 0, result.stderr
    assert len(read_rows(tmp_path / "log.csv")) == 3
