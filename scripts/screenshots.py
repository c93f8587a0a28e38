"""`make screenshots`: the real app, hosting the real default run, photographed.

Runs XltopApp headless at 160x45 on a real Monitor and HostedRun (the default preset, as `xltop`
starts it), lets the charts fill for a while, then saves SVG (and PNG, with rsvg-convert when it
is installed) of the main screen, the help screen and the kill dialog into screenshots/, and
browser.png, the TUI served to a real headless Chromium (the browser test's own screenshot). The
process table keeps to this session's own processes (the script and the run it hosts), the run
is started as `.venv/bin/python -m ttt_runtime ...` from the checkout rather than by its absolute
path, and the header names the host "localhost": the pictures show xltop, not the machine they
were taken on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from xltop.monitor import Monitor
from xltop.runsources import HostedRun
from xltop.sources import SystemSource
from xltop.tui.app import XltopApp
from xltop.tui.widgets.kill_dialog import KillDialog
from xltop.tui.widgets.processes import ProcessTable

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "screenshots"
SIZE = (160, 45)


class SessionSource(SystemSource):
    """The machine's figures, but only this script's process tree in the process table."""

    def sample(self, run_pid=None):
        system, processes = super().sample(run_pid)
        session = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
        return system, tuple(p for p in processes if p.pid in session)


async def until(pilot, predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: timed out waiting for {what}")
        await pilot.pause(0.1)


def save(app: XltopApp, name: str) -> None:
    svg = OUT / f"{name}.svg"
    app.save_screenshot(str(svg))
    # Rich writes spaces as &#160; but rsvg-convert still drops them at the start of a text run
    # ("xltop 0.1.0|  running|"): preserve tells it to keep every one.
    svg.write_text(svg.read_text().replace("<svg ", '<svg xml:space="preserve" ', 1))
    if shutil.which("rsvg-convert"):
        subprocess.run(["rsvg-convert", str(svg), "-o", str(svg.with_suffix(".png"))], check=True)
    print(f"screenshots: {svg.with_suffix('.*')}")


async def photograph(seconds: float) -> None:
    monitor = Monitor(SessionSource(), HostedRun([]), interval=1.0)
    app = XltopApp(monitor, host="localhost")
    try:
        async with app.run_test(size=SIZE) as pilot:
            run = lambda: app.last.run if app.last else None  # noqa: E731
            await until(pilot, lambda: run() and run().state == "running", "the run", 180)
            await until(pilot, lambda: run().sampled_step is not None, "per-block figures", 120)
            started = time.monotonic()
            await until(pilot, lambda: time.monotonic() - started > seconds, "history", seconds + 5)
            save(app, "main")
            await pilot.press("question_mark")
            await pilot.pause(0.5)
            save(app, "help")
            await pilot.press("escape")
            app.main_screen.query_one(ProcessTable).select_pid(run().pid)
            await pilot.press("k")
            await until(pilot, lambda: isinstance(app.screen, KillDialog), "the kill dialog", 30)
            await pilot.pause(0.5)
            save(app, "kill_dialog")
            await pilot.press("n")  # never kill anything for a picture
    finally:
        monitor.close()


def photograph_browser() -> None:
    """screenshots/browser.png: tests/xltop/test_serve.py keeps its browser's screenshot there."""
    target = OUT / "browser.png"
    target.unlink(missing_ok=True)  # the test skips without Chromium: no stale picture stays
    env = dict(os.environ, XLTOP_BROWSER_SCREENSHOT=str(target))
    test = ["tests/xltop/test_serve.py", "-k", "real_browser", "-p", "no:cacheprovider", "-q"]
    subprocess.run([sys.executable, "-m", "pytest", *test], env=env, check=True)
    print(f"screenshots: {target}" if target.exists() else "screenshots: no Chromium, no picture")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="history before the shots")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    # The hosted run is started with this interpreter's path: relative to the checkout, so that
    # its command line (process table, kill dialog) does not show where the checkout lives.
    os.chdir(REPO)
    sys.executable = os.path.relpath(sys.executable)
    asyncio.run(photograph(args.seconds))
    photograph_browser()


if __name__ == "__main__":
    sys.exit(main())
