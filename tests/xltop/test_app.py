"""Pilot tests of every key of the TUI, against a real spawned run where the key talks to the run.

The app runs headless in-process (App.run_test) on a real Monitor: real psutil sampling, a real
`ttt-run --preset tiny` over its real socket, real child processes to kill.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import process_gone, read_rows
from fake_source import FakeMonitor, fake_snapshot
from textual.geometry import Region

from xltop.runsources import AttachedRun, HostedRun
from xltop.snapshot import RunState
from xltop.tui.app import XltopApp
from xltop.tui.commands import COMMANDS
from xltop.tui.widgets.blocks import BlocksTable
from xltop.tui.widgets.events import EventLine
from xltop.tui.widgets.help_screen import HelpScreen
from xltop.tui.widgets.kill_dialog import KillDialog
from xltop.tui.widgets.memory import MemoryPanel
from xltop.tui.widgets.processes import ProcessTable

TIMEOUT_S = 60.0  # generous: the machine is small and shared
ALL_PROCESSES = 100_000  # top_n that lists every process (the kill tests need small ones)


def pilot_test(test):
    """Run an async Pilot test with asyncio.run (no async pytest plugin is needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))

    return run


async def until(pilot, predicate: Callable[[], object], what: str, timeout: float = TIMEOUT_S):
    """Let the app run until `predicate()` is true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


def events(app: XltopApp) -> str:
    return "\n".join(app.main_screen.query_one(EventLine).events)


def run_of(app: XltopApp):
    return app.last.run if app.last is not None else None


def state(app: XltopApp) -> str | None:
    run = run_of(app)
    return run.state if run is not None else None


async def until_steps(pilot, app: XltopApp, n: int = 1) -> int:
    """Wait until the run has made `n` more steps than now; return the step count."""
    start = run_of(app).step if run_of(app) else 0
    await until(pilot, lambda: run_of(app) and run_of(app).step >= start + n, f"{n} steps")
    return run_of(app).step


@pytest.fixture
def attached(tiny_run, monitors, tmp_path):
    """Factory: an app watching a real tiny run (spawned by the test) through its socket."""

    def make(**app_kwargs) -> tuple[XltopApp, object]:
        run = tiny_run("--checkpoint-dir", str(tmp_path / "checkpoints"))
        monitor = monitors(AttachedRun(run.socket_path), top_n=app_kwargs.pop("top_n", 30))
        return XltopApp(monitor, **app_kwargs), run

    return make


@pilot_test
async def test_p_pauses_the_run_itself_and_resumes_it(attached):
    app, _ = attached()
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: state(app) == "running", "the run")
        await until_steps(pilot, app, 2)
        await pilot.press("p")
        await until(pilot, lambda: state(app) == "paused", "the paused state")
        paused_at = run_of(app).step
        shown = app.snapshots_shown
        await until(pilot, lambda: app.snapshots_shown >= shown + 5, "five ticks")
        assert run_of(app).step == paused_at  # the step counter stopped
        assert "run paused" in events(app)
        assert "RUN PAUSED" in str(app.main_screen.query_one("#header").content)
        await pilot.press("p")
        await until(pilot, lambda: state(app) == "running", "the run to resume")
        await until_steps(pilot, app, 2)
        assert "sent resume" in events(app)


@pilot_test
async def test_c_clears_the_runs_mlx_cache(attached):
    app, _ = attached()
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: run_of(app) and run_of(app).mlx, "MLX memory figures")
        await until(pilot, lambda: run_of(app).mlx.cache > 0, "a non-empty MLX cache")
        # Paused first: a running step would refill the cache before the next report.
        await pilot.press("p")
        await until(pilot, lambda: state(app) == "paused", "the paused state")
        before = run_of(app).mlx.cache
        await pilot.press("c")
        await until(pilot, lambda: "clear_cache: ok" in events(app), "the run's reply")
        await until(pilot, lambda: run_of(app).mlx.cache < before, "a smaller cache figure")


@pilot_test
async def test_r_resets_the_fast_weights_into_a_new_conversation(attached):
    app, _ = attached()
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: state(app) == "running", "the run")
        conversation = run_of(app).conversation
        await pilot.press("r")
        await until(pilot, lambda: run_of(app).conversation > conversation, "a new conversation")
        assert "reset: ok" in events(app)


@pilot_test
async def test_s_saves_a_checkpoint(attached, tmp_path):
    app, _ = attached()
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: state(app) == "running", "the run")
        await pilot.press("s")
        await until(pilot, lambda: "save: ok -> " in events(app), "the saved checkpoint")
        path = events(app).split("save: ok -> ")[1].splitlines()[0]
        assert Path(path).is_file() and Path(path).parent == tmp_path / "checkpoints"


@pilot_test
async def test_l_starts_and_stops_csv_logging(attached, tmp_path):
    csv_path = tmp_path / "log.csv"
    app, _ = attached(csv_path=str(csv_path))
    app.csv.stop()  # as if started without logging, with a path chosen
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: state(app) == "running", "the run")
        assert not csv_path.exists()
        await pilot.press("l")
        await until(pilot, lambda: csv_path.exists() and len(read_rows(csv_path)) >= 3, "rows")
        assert f"CSV {csv_path}" in str(app.main_screen.query_one("#header").content)
        await pilot.press("l")
        await until(pilot, lambda: "CSV log closed" in events(app), "the log to close")
        rows = read_rows(csv_path)
        shown = app.snapshots_shown
        await until(pilot, lambda: app.snapshots_shown >= shown + 3, "three more ticks")
        assert len(read_rows(csv_path)) == len(rows)  # no rows after stopping
        assert rows[-1]["run_state"] == "running" and int(rows[-1]["step"]) > 0


async def open_kill_dialog(pilot, app: XltopApp, pid: int, key: str) -> ProcessTable:
    """Select `pid` in the process table once it is listed, press `key`, wait for the dialog."""
    table = app.main_screen.query_one(ProcessTable)
    await until(pilot, lambda: pid in table.processes, f"pid {pid} in the table")
    table.select_pid(pid)
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, KillDialog), "the kill dialog")
    return table


@pilot_test
async def test_k_kills_a_child_process_after_confirmation(monitors, children):
    victim = children("sleep", "300")
    app = XltopApp(monitors(top_n=ALL_PROCESSES))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_kill_dialog(pilot, app, victim.pid, "k")
        assert app.screen.target.pid == victim.pid and "sleep 300" in app.screen.target.command
        await pilot.press("y")
        await until(pilot, lambda: process_gone(victim.pid), "the child to end")
        await until(pilot, lambda: "ended on SIGTERM" in events(app), "the kill's report")


@pilot_test
async def test_f9_opens_the_same_dialog_and_cancel_spares_the_process(monitors, children):
    victim = children("sleep", "300")
    app = XltopApp(monitors(top_n=ALL_PROCESSES))
    async with app.run_test(size=(120, 40)) as pilot:
        table = await open_kill_dialog(pilot, app, victim.pid, "f9")
        # The dialog is locked on its process even if the selection moves underneath.
        table.move_cursor(row=0)
        await pilot.press("n")
        await until(pilot, lambda: "cancelled" in events(app), "the cancel")
        assert f"pid {victim.pid}" in events(app)
        assert victim.poll() is None


@pytest.mark.parametrize("whom", ["init", "xltop itself"])
@pilot_test
async def test_k_refuses_pid_1_and_xltop_itself(monitors, whom):
    pid = 1 if whom == "init" else os.getpid()
    app = XltopApp(monitors(top_n=ALL_PROCESSES))
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.main_screen.query_one(ProcessTable)
        await until(pilot, lambda: pid in table.processes, f"pid {pid} in the table")
        table.select_pid(pid)
        await pilot.press("k")
        await until(pilot, lambda: "refused" in events(app), "the refusal")
        assert whom in events(app)
        assert not isinstance(app.screen, KillDialog)


@pilot_test
async def test_readonly_removes_kill_and_every_run_command(attached, monkeypatch):
    monkeypatch.setenv("XLTOP_READONLY", "1")
    app, _ = attached(top_n=ALL_PROCESSES)
    assert app.readonly
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: state(app) == "running", "the run")
        app.main_screen.query_one(ProcessTable).select_pid(run_of(app).pid)
        await pilot.press("p", "c", "r", "s", "k", "f9")
        await until_steps(pilot, app, 3)
        assert state(app) == "running"  # not paused
        assert not any(e.startswith("sent ") for e in app.main_screen.query_one(EventLine).events)
        assert not isinstance(app.screen, KillDialog)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert titles and not any(t.startswith(("Pause", "Kill", "Clear", "Save")) for t in titles)
        footer_actions = {b.action for _, b, enabled, _ in app.active_bindings.values() if enabled}
        assert "kill" not in footer_actions and "toggle_pause" not in footer_actions


@pilot_test
async def test_a_csv_log_that_fails_stops_and_says_so_once(monitors, tmp_path):
    folder = tmp_path / "gone"
    app = XltopApp(monitors(), csv_path=str(folder / "log.csv"))
    async with app.run_test(size=(120, 40)) as pilot:
        said = f"cannot log to {folder / 'log.csv'}: folder {folder} does not exist"
        await until(pilot, lambda: said in events(app), "the CSV failure")
        shown = app.snapshots_shown
        await until(pilot, lambda: app.snapshots_shown >= shown + 3, "three more ticks")
        assert [e for e in app.main_screen.query_one(EventLine).events if "cannot log" in e] == [
            f"{said}; monitoring goes on"  # the headless modes' words
        ]
        assert "CSV off" in str(app.main_screen.query_one("#header").content)


@pilot_test
async def test_big_r_restarts_a_dead_run_and_q_stops_it_cleanly(monitors, tmp_path):
    runtime = HostedRun(["--preset", "tiny"])
    monitor = monitors(runtime)
    csv_path = tmp_path / "quit.csv"
    app = XltopApp(monitor, csv_path=str(csv_path))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: state(app) == "running", "the hosted run")
        first_pid = runtime.pid
        await pilot.press("R")  # a live run is not restarted
        await until(pilot, lambda: "not restarted" in events(app), "the refusal to restart")
        os.kill(first_pid, signal.SIGKILL)
        await until(pilot, lambda: state(app) == "dead", "the dead state")
        assert "DEAD" in str(app.main_screen.query_one("#header").content)
        # a signal's end is said by its name (a negative exit code means nothing to a user)
        await until(pilot, lambda: "run stopped (killed by SIGKILL)" in events(app), "the event")
        await pilot.press("R")
        await until(pilot, lambda: state(app) == "running" and runtime.pid != first_pid, "restart")
        second = runtime._proc
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, "the app to exit")
    assert second.poll() == 0  # stopped cleanly by the stop command, not killed
    rows = read_rows(csv_path)  # closed with whole rows
    assert rows and {r["run_state"] for r in rows} >= {"running", "dead"}


def test_each_style_selector_is_written_once():
    css = Path(inspect.getfile(XltopApp)).with_name(XltopApp.CSS_PATH).read_text()
    selectors = re.findall(r"^([^\s{}/][^{}/\n]*?)\s*\{", css, re.MULTILINE)
    assert "Screen" in selectors and len(selectors) == len(set(selectors)), selectors


@pilot_test
async def test_a_stalled_run_is_marked_in_its_own_colour_with_no_throughput():
    app = XltopApp(FakeMonitor(ticks=0), host="testhost")
    async with app.run_test(size=(120, 40)) as pilot:
        snapshot = fake_snapshot(3, state=RunState.STALLED)
        # What a run source reports for a stalled run: no throughput, no step time.
        run = dataclasses.replace(snapshot.run, tokens_per_s=None, step_ms=None)
        app.show_snapshot(dataclasses.replace(snapshot, run=run))
        await pilot.pause(0.1)
        header = app.main_screen.query_one("#header").content
        text = str(header)
        assert "RUN STALLED (no report)" in text and " - tok/s  - ms/step" in text
        assert f"step {run.step} " in text  # the last reported figures stand
        styles = {str(s.style) for s in header.spans if "STALLED" in text[s.start : s.end]}
        assert styles == {"bold magenta"}  # not running's green, paused's yellow, dead's red


@pilot_test
async def test_f_freezes_the_display_while_the_run_goes_on(attached):
    app, _ = attached()
    async with app.run_test(size=(120, 40)) as pilot:
        await until_steps(pilot, app, 2)
        await pilot.press("f")
        panel = app.main_screen.query_one(MemoryPanel)
        frozen_snapshot, frozen_step = panel.snapshot, run_of(app).step
        await until_steps(pilot, app, 3)
        assert panel.snapshot is frozen_snapshot
        assert "FROZEN" in str(app.main_screen.query_one("#header").content)
        assert run_of(app).step > frozen_step  # the run went on
        await pilot.press("f")
        await until(pilot, lambda: panel.snapshot is not frozen_snapshot, "a live display")


@pilot_test
async def test_plus_minus_change_the_interval_and_o_g_sort_and_chart(monitors):
    monitor = monitors()
    app = XltopApp(monitor)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.last is not None, "the first tick")
        await pilot.press("plus", "plus")
        assert monitor.interval == 1.0
        await pilot.press("minus")
        assert monitor.interval == 0.5
        assert "interval 0.5 s" in events(app)
        table = app.main_screen.query_one(ProcessTable)
        await pilot.press("o")
        assert table.sort_column == "cpu"
        await pilot.press("g")
        assert "chart: tokens/s" in events(app)


@pilot_test
async def test_help_screen_and_palette_offer_every_command(monitors):
    app = XltopApp(monitors())
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        live = [c for c in COMMANDS if c.scope != "replay"]  # the replay's keys: test_replay.py
        table = app.screen.query_one("#help-table")
        assert table.row_count == len(live)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "help to close")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert len(titles) == len(live)


@pilot_test
async def test_resizing_never_crashes(attached):
    app, _ = attached()
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: state(app) == "running", "the run")
        for width, height in ((40, 12), (200, 60), (20, 5), (80, 24)):
            await pilot.resize_terminal(width, height)
            shown = app.snapshots_shown
            await until(pilot, lambda s=shown: app.snapshots_shown > s, "a tick at a new size")
        assert app.is_running


def drawn(widget) -> str:
    """The text a widget paints now, through the same render path as the screen's."""
    return "\n".join(strip.text for strip in widget.render_lines(Region(0, 0, *widget.size)))


@pilot_test
async def test_tables_redraw_exactly_the_cells_a_tick_changed():
    # RowTable keeps every unchanged row's cached render across ticks: what it paints must still
    # follow each update_cell, and only the changed rows may differ.
    app = XltopApp(FakeMonitor(ticks=0), host="testhost")
    async with app.run_test(size=(160, 45)) as pilot:
        blocks, processes = (app.main_screen.query_one(t) for t in (BlocksTable, ProcessTable))
        for k in (0, 1):  # the first tick's paint settles the column widths
            app.show_snapshot(fake_snapshot(k))
            await pilot.pause(0.1)  # painted: the render caches hold tick k
        before = drawn(blocks), drawn(processes)
        block0 = 2  # its line: under the border and the header
        assert "903 MiB" in before[1] and " 0.001 " in before[0].splitlines()[block0]
        app.show_snapshot(fake_snapshot(5))
        await pilot.pause(0.1)
        after = drawn(blocks), drawn(processes)
        assert "915 MiB" in after[1] and "903 MiB" not in after[1]  # the run's RSS
        assert " 0.005 " in after[0].splitlines()[block0]  # block 0's drift
        lines = zip(before[1].splitlines(), after[1].splitlines(), strict=True)
        assert sum(a != b for a, b in lines) == 1  # only the run's row: no other process changed


@pilot_test
async def test_a_process_that_comes_as_one_goes_takes_its_row_without_a_layout():
    # On a busy machine a process enters the top 30 as one leaves in many ticks: removing a row
    # lays the whole screen out again, so the newcomer takes the leaver's row instead.
    app = XltopApp(FakeMonitor(ticks=0), host="testhost")
    async with app.run_test(size=(160, 45)) as pilot:
        processes = app.main_screen.query_one(ProcessTable)
        app.show_snapshot(fake_snapshot(0))
        await pilot.pause(0.1)
        layouts: list[bool] = []
        refresh = processes.refresh

        def recording(*regions, layout: bool = False, **kwargs):
            layouts.append(layout)
            return refresh(*regions, layout=layout, **kwargs)

        processes.refresh = recording  # type: ignore[method-assign]
        snapshot = fake_snapshot(1)
        *kept, leaver = snapshot.processes
        newcomer = dataclasses.replace(leaver, pid=99_999, command="python newcomer.py")
        app.show_snapshot(dataclasses.replace(snapshot, processes=(*kept, newcomer)))
        await pilot.pause(0.1)
        assert layouts and not any(layouts)
        keys = [row.key.value for row in processes.ordered_rows]
        assert "99999" in keys and str(leaver.pid) not in keys
        assert len(keys) == len(snapshot.processes)
        assert processes.items["99999"] is newcomer
        # a newcomer wider than any command so far widens the column, as an added row does
        command = "python wide.py --" + "x" * 60
        wide = dataclasses.replace(leaver, pid=99_998, command=command, rss=64 << 30)  # on top
        app.show_snapshot(dataclasses.replace(fake_snapshot(2), processes=(*kept, wide)))
        await pilot.pause(0.1)
        assert "99999" not in processes.items
        assert any(command in line for line in drawn(processes).splitlines())


@pilot_test
async def test_no_color_shows_every_panel_in_monochrome(monkeypatch):
    # NO_COLOR (no-color.org) makes Textual pass every line through its Monochrome filter, which
    # reads each segment's Rich style: a chart segment without one ended the app.
    monkeypatch.setenv("NO_COLOR", "1")
    app = XltopApp(FakeMonitor(ticks=0), host="testhost")
    async with app.run_test(size=(160, 45)) as pilot:
        for k in range(3):
            app.show_snapshot(fake_snapshot(k))
            await pilot.pause(0.1)
        chart = drawn(app.main_screen.query_one("#chart-memory"))
        processes = drawn(app.main_screen.query_one(ProcessTable))
    assert app.return_code in (None, 0)
    assert "memory MiB" in chart and any("\u2801" <= c <= "\u28ff" for c in chart)  # braille
    assert "ttt_runtime run" in processes


@pilot_test
async def test_memory_panel_draws_a_bar_a_line_in_its_width_coloured_by_fill():
    # The panel is drawn straight to strips (no Rich Text layout): each bar must still fill
    # the panel's width exactly, in proportion, coloured by how full it is, and a line too
    # long for the panel is cut, never wrapped onto the next bar's line.
    app = XltopApp(FakeMonitor(ticks=0), host="testhost")
    async with app.run_test(size=(160, 45)) as pilot:
        panel = app.main_screen.query_one(MemoryPanel)
        snapshot = fake_snapshot(0)
        busy = dataclasses.replace(snapshot.system, cpu_percent=95.0)
        app.show_snapshot(dataclasses.replace(snapshot, system=busy))
        await pilot.pause(0.1)
        lines = panel.text.splitlines()
        width = panel.size.width
        labels = ["run RSS", "MLX active", "MLX cache", "MLX peak", "system", "CPU"]
        assert [line.split("[")[0].strip() for line in lines] == [*labels, lines[6]]
        assert lines[6] == "MLX ceiling 24 GiB (cpu)"
        for line in lines[:6]:
            assert len(line) == width  # label, bar and figures fill the width
        cpu = lines[5]
        cells = cpu.index("]") - cpu.index("[") - 1
        assert cpu.count("|") == round(0.95 * cells) and "95% run 98%" in cpu
        cpu_fill, system_fill = (
            {s.style.color.name for s in panel.lines()[row] if s.text[:1] == "|"} for row in (5, 4)
        )
        assert cpu_fill == {"red"} and system_fill == {"green"}  # >= 90% red; 50% green
        huge = dataclasses.replace(snapshot.system, used=10**15, total=10**15, cpu_percent=100.0)
        app.show_snapshot(dataclasses.replace(snapshot, system=huge))
        await pilot.pause(0.1)
        lines = panel.text.splitlines()
        assert len(lines) == 7 and lines[6].startswith("MLX ceiling")  # nothing wrapped
        assert len(lines[4]) == width and lines[4].startswith("system     [||||] ")  # cut


# a command line as a hostile user can write it: terminal escapes (retitle, clear the screen) and
# text that Rich or Textual markup would take for tags (an unbalanced closing tag included)
HOSTILE_ARG = "\x1b]0;PWNED\x07\x1b[2J[bold]B[/bold] [/x] [link=http://e]L[/link]"


@pilot_test
async def test_a_hostile_command_line_is_shown_literally_in_the_table_and_kill_dialog(
    monitors, children
):
    victim = children(sys.executable, "-c", "import time; time.sleep(300)", HOSTILE_ARG)
    app = XltopApp(monitors(top_n=ALL_PROCESSES))
    async with app.run_test(size=(250, 40)) as pilot:
        table = await open_kill_dialog(pilot, app, victim.pid, "k")
        shown = drawn(app.screen.query_one("#kill-command"))
        assert "\x1b" not in shown and "\x07" not in shown
        assert "\\x1b]0;PWNED\\x07\\x1b[2J[bold]B[/bold] [/x]" in shown
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, KillDialog), "the dialog to close")
        table.select_pid(victim.pid)  # scrolled onto the screen by the next frames
        await until(pilot, lambda: str(victim.pid) in drawn(table), "the victim's row drawn")
        row = next(line for line in drawn(table).splitlines() if str(victim.pid) in line)
        assert "\x1b" not in row and "\\x1b]0;PWNED" in row
