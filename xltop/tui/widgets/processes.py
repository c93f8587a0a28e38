"""Processes by RSS: sortable by column (click a header or press o), the run's process marked,
filtered by name or command (/), shown as a list or as a tree (t).

Rows are keyed by pid (a KeyedTable): a process that stays is updated cell by cell, one that
appears is added, one that goes is removed. The cursor stays on the same process when the rows
re-sort. The filter and the tree view hold across ticks.
"""

from __future__ import annotations

from typing import Any

from textual.binding import Binding
from textual.widgets import Input

from xltop import units
from xltop.snapshot import ProcessInfo
from xltop.tui.widgets.keyed_table import Column, KeyedTable, Row

RUN_MARK = ">"
COLUMNS: tuple[Column[ProcessInfo], ...] = (
    Column("mark", " ", 1, lambda p: RUN_MARK if p.is_run else ""),
    Column("pid", "pid", 7, lambda p: p.pid, order=lambda p: p.pid),
    Column("user", "user", 6, lambda p: p.user, order=lambda p: p.user),
    Column("name", "name", 12, lambda p: p.name, order=lambda p: p.name, searchable=True),
    Column("rss", "RSS", 8, lambda p: units.size(p.rss), order=lambda p: p.rss, largest_first=True),
    Column("cpu", "CPU%", 5, lambda p: f"{p.cpu_percent:.1f}", order=lambda p: p.cpu_percent,
           largest_first=True),
    Column("command", "command", None, lambda p: p.command, order=lambda p: p.command,
           searchable=True, branch=True),
)  # fmt: skip


def as_tree(rows: list[Row[ProcessInfo]]) -> list[Row[ProcessInfo]]:
    """`rows` (in sort order) as a tree, htop's way: each process under its parent with the
    branch drawn before its command, siblings in sort order; a process whose parent is not
    listed starts a tree of its own."""
    listed = {row.item.pid for row in rows}
    children: dict[int, list[Row[ProcessInfo]]] = {}
    for row in rows:
        children.setdefault(row.item.ppid, []).append(row)
    tree: list[Row[ProcessInfo]] = []
    placed: set[int] = set()

    def place(row: Row[ProcessInfo], indent: str, branch: str) -> None:
        tree.append(Row(row.key, row.item, indent + branch))
        placed.add(row.item.pid)
        kids = [kid for kid in children.get(row.item.pid, []) if kid.item.pid not in placed]
        below = indent + {"": "", "├─ ": "│  ", "└─ ": "   "}[branch]
        for i, kid in enumerate(kids):
            place(kid, below, "└─ " if i == len(kids) - 1 else "├─ ")

    for row in rows:
        if row.item.ppid not in listed and row.item.pid not in placed:
            place(row, "", "")
    for row in rows:  # in a loop of parents (a pid reused mid-scan): never lost
        if row.item.pid not in placed:
            place(row, "", "")
    return tree


class ProcessTable(KeyedTable[ProcessInfo]):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(COLUMNS, key=lambda p: str(p.pid), sort_column="rss", **kwargs)
        self.tree_view = False
        self.heading = ""  # what the title says before the filter and the view

    @property
    def processes(self) -> dict[int, ProcessInfo]:
        """The processes shown, by pid."""
        return {p.pid: p for p in self.items.values()}

    def selected_pid(self) -> int | None:
        key = self.selected_key()
        return None if key is None else int(key)

    def select_pid(self, pid: int) -> None:
        self.select_key(str(pid))

    def in_order(self, items: list[ProcessInfo]) -> list[Row[ProcessInfo]]:
        rows = super().in_order(items)
        return as_tree(rows) if self.tree_view else rows

    def toggle_tree(self) -> bool:
        self.tree_view = not self.tree_view
        self._update()
        self._retitle()
        return self.tree_view

    def set_filter(self, text: str) -> None:
        super().set_filter(text)
        self._retitle()

    def set_heading(self, heading: str) -> None:
        self.heading = heading
        self._retitle()

    def _retitle(self) -> None:
        parts = [self.heading] if self.heading else []
        if self.filter_text:
            parts.append(f"filter: {self.filter_text} (/ edits)")
        if self.tree_view:
            parts.append("tree (t: list)")
        self.border_title = " | ".join(parts) or None


class ProcessFilter(Input):
    """htop's F4 line under the processes table: the table keeps the processes whose name or
    command holds the text as it is typed; Enter keeps the filter, Esc clears it."""

    BINDINGS = [Binding("escape", "clear", "Clear the filter")]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(placeholder="filter processes by name or command", **kwargs)

    def open(self) -> None:
        self.display = True
        self.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.table.set_filter(event.value)

    def on_input_submitted(self) -> None:
        self._close()

    def action_clear(self) -> None:
        self.value = ""
        self.table.set_filter("")  # now: Changed arrives later, the table should not wait
        self._close()

    @property
    def table(self) -> ProcessTable:
        return self.screen.query_one(ProcessTable)

    def _close(self) -> None:
        self.display = False
        self.table.focus()
