"""Processes by RSS: sortable by column (click a header or press o), the run's process marked.

Rows are keyed by pid (a KeyedTable): a process that stays is updated cell by cell, one that
appears is added, one that goes is removed. The cursor stays on the same process when the rows
re-sort.
"""

from __future__ import annotations

from typing import Any

from xltop import units
from xltop.snapshot import ProcessInfo
from xltop.tui.widgets.keyed_table import Column, KeyedTable

RUN_MARK = ">"
COLUMNS: tuple[Column[ProcessInfo], ...] = (
    Column("mark", " ", 1, lambda p: RUN_MARK if p.is_run else ""),
    Column("pid", "pid", 7, lambda p: p.pid, order=lambda p: p.pid),
    Column("user", "user", 6, lambda p: p.user, order=lambda p: p.user),
    Column("name", "name", 12, lambda p: p.name, order=lambda p: p.name),
    Column("rss", "RSS", 8, lambda p: units.size(p.rss), order=lambda p: p.rss, largest_first=True),
    Column("cpu", "CPU%", 5, lambda p: f"{p.cpu_percent:.1f}", order=lambda p: p.cpu_percent,
           largest_first=True),
    Column("command", "command", None, lambda p: p.command, order=lambda p: p.command),
)  # fmt: skip


class ProcessTable(KeyedTable[ProcessInfo]):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(COLUMNS, key=lambda p: str(p.pid), sort_column="rss", **kwargs)

    @property
    def processes(self) -> dict[int, ProcessInfo]:
        """The processes shown, by pid."""
        return {p.pid: p for p in self.items.values()}

    def selected_pid(self) -> int | None:
        key = self.selected_key()
        return None if key is None else int(key)

    def select_pid(self, pid: int) -> None:
        self.select_key(str(pid))
