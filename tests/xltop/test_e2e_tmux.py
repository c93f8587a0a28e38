"""End to end: the real `xltop` binary in a real terminal (tmux), keys pressed, screen read."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import process_gone, read_rows
from polling import wait_until

XLTOP = Path(sys.executable).parent / "xltop"
TIMEOUT_S = 120.0  # the run imports MLX on a small shared machine

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """One private tmux server (its own socket) holding one session."""

    def __init__(self, tmp_path: Path):
        # its socket in the test's folder: -L would leave tmux's /tmp/tmux-UID behind
        self.socket = str(tmp_path / "tmux.sock")

    def __call__(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        return out.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "xltop")

    def quit(self, exit_file: Path) -> str:
        """Press q; the exit status the session's command wrote to `exit_file`."""
        self("send-keys", "-t", "xltop", "q")
        return wait_until(
            lambda: exit_file.exists() and exit_file.read_text().strip(),
            TIMEOUT_S,
            lambda: f"xltop to exit:\n{self.screen()}",
            interval=0.2,
        )

    def size(self) -> str:
        return self("display", "-p", "-t", "xltop", "#{window_width}x#{window_height}").strip()

    def wait_for(self, what: str, predicate, timeout: float = TIMEOUT_S) -> str:
        """The screen, once `predicate` accepts it."""
        return wait_until(
            lambda: predicate(screen := self.screen()) and screen,
            timeout,
            lambda: f"{what} on the {self.size()} screen:\n{self.screen()}",
            interval=0.2,
        )


@pytest.fixture
def tmux(tmp_path):
    session = Tmux(tmp_path)
    yield session
    session("kill-server")


def live_step(screen: str) -> int:
    match = re.search(r"pid (\d+)\s+step (\d+)", screen)
    return int(match.group(2)) if match else 0


def csv_rows(folder: Path) -> list[dict[str, str]]:
    """Rows of the CSV log xltop names itself when `l` is pressed (none before it exists)."""
    logs = list(folder.glob("xltop-*.csv"))
    return read_rows(logs[0]) if logs else []


def test_xltop_in_tmux_pause_clear_log_quit(tmux, tmp_path):
    exit_file = tmp_path / "exit_code"
    command = f"env -u LD_PRELOAD -u COLUMNS -u LINES {XLTOP} --preset tiny; echo $? > {exit_file}"
    tmux("new-session", "-d", "-s", "xltop", "-x", "120", "-y", "40", "-c", str(tmp_path),
         command)  # fmt: skip
    screen = tmux.wait_for("live step counter", lambda s: live_step(s) > 0)
    run_pid = int(re.search(r"pid (\d+)\s+step", screen).group(1))
    assert "MLX cpu" in screen and "running" in screen

    tmux("send-keys", "-t", "xltop", "p")
    paused = tmux.wait_for("paused run", lambda s: "RUN PAUSED" in s)
    time.sleep(2.0)
    assert live_step(tmux.screen()) == live_step(paused)  # the run really stopped

    tmux("send-keys", "-t", "xltop", "c")
    tmux.wait_for("clear_cache reply", lambda s: "clear_cache: ok" in s)

    tmux("send-keys", "-t", "xltop", "l")
    tmux.wait_for("CSV logging event", lambda s: "CSV logging to xltop-" in s)
    tmux("send-keys", "-t", "xltop", "p")  # resume, so the log gets running rows
    tmux.wait_for("resumed run", lambda s: "RUN PAUSED" not in s and live_step(s) > 0)
    wait_until(lambda: len(csv_rows(tmp_path)) >= 2, TIMEOUT_S, "CSV rows", interval=0.2)

    assert tmux.quit(exit_file) == "0"
    assert process_gone(run_pid)  # the hosted run was stopped
    rows = csv_rows(tmp_path)
    assert rows and all(r["ts"] for r in rows)  # closed with whole rows


# xltop's own main, with a fault injected where the TUI shows a Snapshot of a stepping run: it
# writes the run's pid to argv[1], then raises.
FAILING_TUI = """
import sys
from pathlib import Path
from xltop.cli import main
from xltop.tui.app import XltopApp
show = XltopApp.show_snapshot
def failing(self, snapshot):
    if snapshot.run is None or not snapshot.run.step:
        return show(self, snapshot)
    Path(sys.argv[1]).write_text(str(snapshot.run.pid))
    raise RuntimeError("injected fault")
XltopApp.show_snapshot = failing
sys.exit(main(["--preset", "tiny"]))
"""


def test_a_tui_that_ends_on_an_error_exits_1_and_stops_its_run(tmux, tmp_path):
    # Textual prints the traceback of an error that ends the app, and it must not end as a
    # success (NO_COLOR once ended the TUI at its first frame with exit status 0).
    exit_file, pid_file = tmp_path / "exit_code", tmp_path / "run_pid"
    command = (
        f"env -u LD_PRELOAD -u COLUMNS -u LINES {sys.executable} -c '{FAILING_TUI}' "
        f"{pid_file}; echo $? > {exit_file}; sleep 60"
    )  # the pane stays to be read
    tmux("new-session", "-d", "-s", "xltop", "-x", "120", "-y", "40", "-c", str(tmp_path),
         command)  # fmt: skip
    status = wait_until(lambda: exit_file.exists() and exit_file.read_text().strip(), TIMEOUT_S,
                        lambda: f"xltop to exit:\n{tmux.screen()}", interval=0.2)  # fmt: skip
    assert status == "1"
    assert "RuntimeError: injected fault" in tmux("capture-pane", "-p", "-t", "xltop", "-S", "-")
    assert process_gone(int(pid_file.read_text()))  # the hosted run was stopped


def test_xltop_hosts_a_ray_run_shows_its_workers_and_a_killed_stage_restarts(tmux, tmp_path):
    """`xltop --ray-run`: a 2-stage run on a private local cluster (token auth on, as Ray
    starts it, in a private HOME), its workers table and its actors in the Ray panel; a stage
    actor SIGKILLed is restarted and the run goes on; q leaves nothing running."""
    pytest.importorskip("ray")
    exit_file, home = tmp_path / "exit_code", tmp_path / "home"
    home.mkdir()
    # COLUMNS/LINES, where set, would fix the TUI's size (shutil.get_terminal_size reads them
    # first): the pane's own size is wanted
    command = (f"env -u LD_PRELOAD -u RAY_AUTH_MODE -u COLUMNS -u LINES HOME={home} {XLTOP} "
               f"--ray-run --stages 2 "
               f"--preset tiny; echo $? > {exit_file}")  # fmt: skip
    tmux("new-session", "-d", "-s", "xltop", "-x", "160", "-y", "50", "-c", str(tmp_path),
         command)  # fmt: skip
    screen = tmux.wait_for("live step counter", lambda s: live_step(s) > 0, timeout=240)
    run_pid = int(re.search(r"pid (\d+)\s+step", screen).group(1))
    tmux.wait_for("the workers table", lambda s: "sent/recv" in s and " 1.0 " in s)
    tmux.wait_for("the Ray panel's stage actors", lambda s: "StageWorker" in s and "1.0: 1" in s)
    family = psutil.Process(run_pid).children(recursive=True)
    stage = next(p for p in family if "StageWorker" in " ".join(p.cmdline() or [p.name()]))
    stage.kill()
    tmux.wait_for("the restart event", lambda s: f"(pid {stage.pid} on node" in s, timeout=180)
    step = live_step(tmux.screen())
    tmux.wait_for("steps after the restart", lambda s: live_step(s) > step, timeout=180)

    assert tmux.quit(exit_file) == "0"
    gone = wait_until(lambda: not any(p.is_running() for p in family), 60, "the run's processes")
    assert gone and process_gone(run_pid)
