"""A hosted run does not outlive the process that started it, even when that one is SIGKILLed."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

HOST = """
import sys, time
from ttt_runtime.launch import spawn_run
run = spawn_run(["--preset", "tiny"])
print(run.pid, flush=True)
time.sleep(600)
"""


def test_run_stops_when_its_host_is_killed():
    host = subprocess.Popen([sys.executable, "-c", HOST], stdout=subprocess.PIPE, text=True)
    try:
        run_pid = int(host.stdout.readline())
        run = psutil.Process(run_pid)
        assert run.is_running()
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)
        # The run may still be importing MLX when its lifeline closes: give it that long.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run.is_running() and run.status() != "zombie":
            time.sleep(0.2)
        assert not run.is_running() or run.status() == "zombie", "the run outlived its host"
    finally:
        host.kill()
        host.wait()
        if "run_pid" in locals() and psutil.pid_exists(run_pid):
            os.kill(run_pid, signal.SIGKILL)


def test_exit_with_parent_stops_the_run_cleanly_when_stdin_closes(tmp_path):
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ttt_runtime",
            "run",
            "--preset",
            "tiny",
            "--exit-with-parent",
            "--socket",
            str(tmp_path / "run.sock"),
        ],  # fmt: skip
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run.poll() is None, "the run ended before its stdin closed"
        run.stdin.close()
        assert run.wait(timeout=60) == 0
    finally:
        run.kill()
        run.wait()


def test_a_run_whose_xltop_is_killed_leaves_no_private_folder_behind(private_tmpdir):
    tmpdir = private_tmpdir  # of xltop and its run: only their folders land here
    xltop = subprocess.Popen(
        [sys.executable, "-m", "xltop", "--headless", "--quiet", "--preset", "tiny"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, TMPDIR=str(tmpdir)), start_new_session=True,
    )  # fmt: skip
    runs: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not (runs and list(tmpdir.glob("ttt-run-*/run.sock"))):
            assert xltop.poll() is None and time.monotonic() < deadline, "no run started"
            runs = psutil.Process(xltop.pid).children()
            time.sleep(0.1)
        assert len(runs) == 1
        os.kill(xltop.pid, signal.SIGKILL)
        xltop.wait(10)
        _, alive = psutil.wait_procs(runs, timeout=60)  # its lifeline closed: it stops
        assert not alive, "the run outlived xltop"
        assert list(tmpdir.glob("ttt-run-*")) == []
    finally:
        xltop.kill()
        xltop.wait()
        for run in runs:
            with contextlib.suppress(psutil.NoSuchProcess):
                run.kill()


def _standalone_run(socket: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ttt_runtime", "run", "--preset", "tiny", "--socket", socket],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_ctrl_c_stops_a_standalone_run_cleanly(tmp_path):
    """A terminal's Ctrl-C (SIGINT) is the same clean stop as SIGTERM: exit 0, no traceback."""
    socket = tmp_path / "run.sock"
    run = _standalone_run(str(socket))
    try:
        deadline = time.monotonic() + 60
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert socket.exists(), "the run never opened its socket"
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
        assert run.returncode == 0, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    finally:
        run.kill()
        run.wait()
