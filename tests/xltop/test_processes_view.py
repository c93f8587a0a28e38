"""The processes table's filter (/) and tree view (t), under Pilot with a real process tree: a
parent process with two children, spawned here and stopped by pid; and RowTable, the table it
is drawn by, against DataTable."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from rich.style import Style
from rich.text import Text
from test_app import ALL_PROCESSES, drawn, events, pilot_test, until
from textual.app import App, ComposeResult
from textual.containers import Horizontal
from textual.geometry import Region
from textual.widgets import DataTable

from xltop.snapshot import ProcessInfo
from xltop.sources import SystemSource
from xltop.tui.app import XltopApp
from xltop.tui.widgets.keyed_table import Row
from xltop.tui.widgets.processes import ProcessFilter, ProcessTable, as_tree
from xltop.tui.widgets.row_table import RowTable, literal

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="children name themselves in /proc")

# The parent (its command holds MARK) starts two children that rename themselves KID_NAME (their
# command lines do not hold it), prints their pids and sleeps.
MARK = f"xqparent{os.getpid()}"
KID_NAME = f"xqkid{os.getpid()}"[:15]  # a process name is at most 15 bytes
KID = "open('/proc/self/comm', 'w').write(__import__('os').environ['KID_NAME']); input()"
PARENT = f"""
import subprocess, sys, time
kids = [subprocess.Popen([sys.executable, "-c", {KID!r}], stdin=subprocess.PIPE) for _ in "ab"]
print(*(kid.pid for kid in kids), flush=True)
time.sleep(300)
"""


class Tree:
    def __init__(self, parent: int, kids: list[int]) -> None:
        self.parent, self.kids = parent, kids

    def named(self) -> bool:
        """True once both children have renamed themselves."""
        return all(psutil.Process(kid).name() == KID_NAME for kid in self.kids)


@pytest.fixture
def process_tree():
    env = dict(os.environ, KID_NAME=KID_NAME)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, MARK], stdout=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    kids: list[int] = []
    try:
        kids = [int(pid) for pid in parent.stdout.readline().split()]
        tree = Tree(parent.pid, kids)
        deadline = time.monotonic() + 30
        while not tree.named():
            assert time.monotonic() < deadline, "the children never renamed themselves"
            time.sleep(0.05)
        yield tree
    finally:
        for pid in [*kids, parent.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()
        parent.stdout.close()
        for kid in kids:  # not our children (init reaps them): wait till they are gone
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(kid).wait(10)


async def table_with(pilot, app: XltopApp, tree: Tree) -> ProcessTable:
    table = app.main_screen.query_one(ProcessTable)
    wanted = {tree.parent, *tree.kids}
    await until(pilot, lambda: wanted <= table.processes.keys(), "the process tree in the table")
    return table


async def ticks(pilot, app: XltopApp, n: int) -> None:
    shown = app.snapshots_shown
    await until(pilot, lambda: app.snapshots_shown >= shown + n, f"{n} more ticks")


@pilot_test
async def test_slash_filters_by_name_or_command_across_ticks_and_escape_clears(
    monitors, process_tree
):
    app = XltopApp(monitors(top_n=ALL_PROCESSES))
    async with app.run_test(size=(160, 40)) as pilot:
        table = await table_with(pilot, app, process_tree)
        line = app.main_screen.query_one(ProcessFilter)
        assert not line.display
        await pilot.press("slash", *MARK)  # the parent's command holds it
        assert line.display and line.has_focus
        await until(pilot, lambda: table.processes.keys() == {process_tree.parent}, "by command")
        await pilot.press("enter")  # keeps the filter, back to the table
        assert not line.display and table.has_focus
        assert f"filter: {MARK}" in str(table.border_title)
        await ticks(pilot, app, 3)
        assert table.processes.keys() == {process_tree.parent}  # it holds across ticks
        await pilot.press("slash", *(["backspace"] * len(MARK)), *KID_NAME.upper())
        kids = set(process_tree.kids)  # by name, in any case
        await until(pilot, lambda: table.processes.keys() == kids, "the children, by name")
        assert [line for line in drawn(table).splitlines() if KID_NAME in line]
        await pilot.press("escape")  # clears it
        assert not line.display and line.value == "" and table.has_focus
        assert table.filter_text == "" and not table.border_title
        await ticks(pilot, app, 1)
        assert {process_tree.parent, *kids, os.getpid()} <= table.processes.keys()


@pilot_test
async def test_t_shows_each_process_under_its_parent_across_ticks(monitors, process_tree):
    app = XltopApp(monitors(top_n=ALL_PROCESSES))
    async with app.run_test(size=(160, 40)) as pilot:
        table = await table_with(pilot, app, process_tree)
        parent, kids = str(process_tree.parent), [str(kid) for kid in process_tree.kids]
        row_before = next(row for key, row in table.rows.items() if key.value == parent)
        await pilot.press("t")
        assert "processes as a tree" in events(app) and "tree" in str(table.border_title)
        for _ in range(3):  # and across ticks
            keys = [row.key.value for row in table.ordered_rows]
            at = keys.index(parent)
            assert sorted(keys[at + 1 : at + 3]) == sorted(kids)  # right under their parent
            above = table.shown[parent].branch.replace("├─ ", "│  ").replace("└─ ", "   ")
            branches = [table.shown[key].branch for key in keys[at + 1 : at + 3]]
            assert branches == [above + "├─ ", above + "└─ "]
            table.select_key(kids[0])  # the family scrolled onto the screen
            await until(pilot, lambda: all(f" {k} " in drawn(table) for k in kids), "the children")
            text = drawn(table)  # one paint: the two children may swap places between ticks
            lines = [line for line in text.splitlines() if any(f" {k} " in line for k in kids)]
            drawn_branches = [b for line in lines for b in ("├─ ", "└─ ")
                              if f"{above}{b}{sys.executable} -c" in line]  # fmt: skip
            assert sorted(drawn_branches) == sorted(["├─ ", "└─ "])
            await ticks(pilot, app, 1)
        # updated by row key: the rows stayed, only their order and branches changed
        assert table.rows[row_before.key] is row_before
        await pilot.press("t")
        assert "processes as a list" in events(app) and not table.border_title
        assert all(row.branch == "" for row in table.shown.values())
        await pilot.pause()
        assert "└─ " not in drawn(table) and "├─ " not in drawn(table)


def test_the_source_lists_the_runs_workers_with_their_parent_whatever_their_size(process_tree):
    source = SystemSource(top_n=1)  # the largest process only, and the run's family
    _, processes = source.sample(run_pid=process_tree.parent)
    parents = {p.pid: p.ppid for p in processes}
    assert parents[process_tree.parent] == os.getpid()
    assert all(parents[kid] == process_tree.parent for kid in process_tree.kids)
    assert len(processes) <= 4


def process(pid: int, ppid: int) -> Row[ProcessInfo]:
    return Row(str(pid), ProcessInfo(pid, "u", f"p{pid}", 0, 0.0, f"cmd{pid}", ppid=ppid))


def test_a_loop_of_parents_loses_no_process():
    # pids reused mid-scan can make 20 and 21 each other's parent: both still show, once each
    rows = [process(10, 1), process(20, 21), process(21, 20), process(11, 10)]
    tree = as_tree(rows)
    assert sorted(row.key for row in tree) == ["10", "11", "20", "21"]
    assert [row.branch for row in tree][:2] == ["", "└─ "]  # 11 under 10


class TwoTables(App[None]):
    """The same rows in DataTable and in RowTable, side by side: str, int, a literal (a plain
    Text) and a styled Text cell."""

    CSS = "DataTable { width: 1fr; height: 8; }"
    AUTO_FOCUS = None
    ROWS = (("1", 4242, "python3 -m run", "0.5"), ("2", 17, "[x] literal", "7.0"),
            ("3", 5, "sleep 300", "0.0"), ("4", 1, "init", "1.5"),
            ("5", 2, Text("bold", style="bold"), "0"))  # fmt: skip

    def compose(self) -> ComposeResult:
        with Horizontal():
            for table in (DataTable(id="plain"), RowTable(id="rows")):
                table.cursor_type, table.zebra_stripes = "row", True
                yield table

    def on_mount(self) -> None:
        for table in self.query(DataTable):
            table.add_columns("pid", "command", "cpu")
            for key, *cells in self.ROWS:
                table.add_row(*map(literal, cells), key=key)


def cells(table: DataTable) -> list[list[tuple[str, Style | None]]]:
    """What a table paints, character by character with its style."""
    lines = table.render_lines(Region(0, 0, *table.size))
    return [[(ch, seg.style) for seg in line for ch in seg.text] for line in lines]


@pilot_test
async def test_row_table_paints_what_datatable_paints_cursor_hover_and_updates_included():
    app = TwoTables()
    async with app.run_test(size=(120, 10)) as pilot:
        tables = app.query_one("#plain", DataTable), app.query_one("#rows", RowTable)
        for table in tables:
            table.move_cursor(row=2)
            table.update_cell("3", table.ordered_columns[2].key, "99.5")  # a tick's change
        painted: dict[str, list] = {"plain": [], "rows": []}
        for table in tables:  # each in turn: unfocused, focused, then with the mouse over row 3
            app.set_focus(None)
            await pilot.hover(app.screen, offset=(0, 9))  # the mouse off both
            await pilot.pause()
            painted[table.id].append(cells(table))
            table.focus()
            await pilot.pause()
            painted[table.id].append(cells(table))
            await pilot.hover(table, offset=(3, 4))
            await pilot.pause()
            painted[table.id].append(cells(table))
        assert painted["rows"] == painted["plain"]
        hovered = painted["plain"][2][4]
        assert hovered != painted["plain"][1][4]  # the hover highlight was there to compare
