"""The TUI's cost: time to render one Snapshot (8 blocks, 30 processes), and the CPU the whole
xltop UI process uses at a 1 s interval while the default run trains next to it.

    .venv/bin/python benchmarks/bench_render.py [--seconds 30]

Render: XltopApp headless at 160x45 fed by the deterministic fake source (tests/xltop); per
Snapshot the CPU time of the update (show_snapshot: tables by row key, charts, bars) and of the
update plus the repaint it causes (layout, every changed widget rendered), medians of N; then
the same with one process replaced by a new one every Snapshot, as on a busy machine (the
newcomer takes the leaver's row; it was a row removed and one added: a layout of the screen).
CPU: the real `xltop` binary in tmux (a real terminal), psutil's CPU time of that process over
the measuring window, as a percentage of one core, beside the run's own; and of the UI's main
thread alone (Textual: update, paint, terminal output; the rest is the sampling thread).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
PAINT_WAIT_S = 0.05  # several of Textual's frames
NEW_PIDS = 100_000  # pids of the processes that come and go (the fake source's are lower)
sys.path.insert(0, str(REPO / "tests" / "xltop"))

from fake_source import N_BLOCKS, N_PROCESSES, FakeMonitor, fake_snapshot  # noqa: E402

from xltop.snapshot import Snapshot  # noqa: E402
from xltop.tui.app import XltopApp  # noqa: E402


def with_a_new_process(k: int) -> Snapshot:
    """Snapshot `k` whose last process is a new one each time (a pid never seen before)."""
    snapshot = fake_snapshot(k)
    *kept, last = snapshot.processes
    newcomer = dataclasses.replace(last, pid=NEW_PIDS + k)
    return dataclasses.replace(snapshot, processes=(*kept, newcomer))


async def render_times(
    n: int, snapshot_at: Callable[[int], Snapshot] = fake_snapshot
) -> tuple[list[float], list[float]]:
    """Per Snapshot: CPU ms of show_snapshot alone, and of it plus the repaint it causes."""
    app = XltopApp(FakeMonitor(ticks=0), host="bench")
    updates, totals = [], []
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.pause(0.1)
        for k in range(n):
            snapshot = snapshot_at(k)
            t0 = time.process_time()
            app.show_snapshot(snapshot)
            t1 = time.process_time()
            # The compositor repaints on its next frame: wait past it. CPU time, not wall time,
            # so the wait itself does not count, the layout and rendering of every widget does.
            # A plain sleep: Pilot.pause's own message-pump round trips cost ~5 ms of CPU each,
            # which no terminal session pays.
            await asyncio.sleep(PAINT_WAIT_S)
            t2 = time.process_time()
            updates.append((t1 - t0) * 1e3)
            totals.append((t2 - t0) * 1e3)
    app.monitor.close()
    return updates, totals


def cpu_share(seconds: float) -> tuple[float, float, float]:
    """(xltop UI %, its main thread's %, run %) of one core over `seconds`, after the run's
    first steps."""
    with tempfile.TemporaryDirectory(prefix="bench-render-") as folder:
        # the server's socket in a folder of its own (-L would leave /tmp/tmux-UID behind)
        return _cpu_share(["tmux", "-S", f"{folder}/tmux.sock"], seconds)


def _cpu_share(tmux: list[str], seconds: float) -> tuple[float, float, float]:
    xltop = Path(sys.executable).parent / "xltop"
    # COLUMNS/LINES inherited from the caller would hold the TUI at 80x24, not the pane's size.
    command = f"env -u LD_PRELOAD -u COLUMNS -u LINES {xltop} --interval 1"
    subprocess.run([*tmux, "new-session", "-d", "-s", "b", "-x", "160", "-y", "45", command],
                   check=True)  # fmt: skip
    try:
        panes = [*tmux, "list-panes", "-F", "#{pane_pid}"]
        shell = psutil.Process(int(subprocess.run(panes, capture_output=True, text=True).stdout))
        deadline = time.monotonic() + 180
        while True:
            family = [shell, *shell.children(recursive=True)]
            ui = next((p for p in family if "bin/xltop" in " ".join(p.cmdline())), None)
            runs = ui.children() if ui else []
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True)
            if runs and " step " in screen.stdout and "running" in screen.stdout:
                break
            if time.monotonic() > deadline:
                raise SystemExit("bench_render: the run never started")
            time.sleep(0.5)
        run = runs[0]
        time.sleep(5)  # past the first steps and the UI's first frames
        before, t0 = cpu_seconds(ui, run), time.monotonic()
        time.sleep(seconds)
        after, t1 = cpu_seconds(ui, run), time.monotonic()
        per_cent = 100 / (t1 - t0)
        ui_s, main_s, run_s = (b - a for a, b in zip(before, after, strict=True))
        return ui_s * per_cent, main_s * per_cent, run_s * per_cent
    finally:
        subprocess.run([*tmux, "send-keys", "-t", "b", "q"])
        time.sleep(5)
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def cpu_seconds(ui: psutil.Process, run: psutil.Process) -> tuple[float, float, float]:
    """CPU seconds so far of the UI process, of its main thread, of the run."""
    main_thread = ui.threads()[0]  # listed first (Linux: /proc/PID/task, the pid's own id first)
    return (sum(ui.cpu_times()[:2]), main_thread.user_time + main_thread.system_time,
            sum(run.cpu_times()[:2]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="xltop TUI render time and CPU share")
    parser.add_argument("--renders", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=30.0, help="CPU measuring window")
    args = parser.parse_args()
    updates, totals = asyncio.run(render_times(args.renders))
    _, churned = asyncio.run(render_times(args.renders, with_a_new_process))
    print(f"render one Snapshot ({N_BLOCKS} blocks, {N_PROCESSES} processes, 160x45), CPU ms, "
          f"median of {args.renders} [p90]:")  # fmt: skip
    rows = (("update", updates), ("update+paint", totals),
            ("  with a process replaced", churned))  # fmt: skip
    for name, values in rows:
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"  {name:26s} {statistics.median(values):6.1f} ms  [{p90:.1f}]  (target < 20 ms)")
    if shutil.which("tmux") is None:
        print("CPU: skipped (tmux is not installed)")
        return
    ui, main_thread, run = cpu_share(args.seconds)
    print(f"CPU over {args.seconds:g} s at a 1 s interval, % of one core: "
          f"xltop UI {ui:.1f}% (target < 3%; its main thread {main_thread:.1f}%)  |  "
          f"the run beside it {run:.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
