"""Processes by RSS: sortable by column (click a header or press o), the run's process marked.

Rows are keyed by pid: a process that stays is updated cell by cell, one that appears is added,
one that goes is removed. The cursor stays on the same process when the rows re-sort.
"""

from __future__ import annotations

from xltop import units
from xltop.snapshot import ProcessInfo
from xltop.tui.widgets.row_table import RowTable, int_key

RUN_MARK = ">"
# column key, label, width (fixed: no width recalculation per tick; None = the rest), the
# ProcessInfo field it sorts by, whether largest first
COLUMNS = (
    ("mark", " ", 1, "is_run", True),
    ("pid", "pid", 7, "pid", False),
    ("user", "user", 6, "user", False),
    ("name", "name", 12, "name", False),
    ("rss", "RSS", 8, "rss", True),
    ("cpu", "CPU%", 5, "cpu_percent", True),
    ("command", "command", None, "command", False),
)
SORTABLE = [c for c in COLUMNS if c[0] != "mark"]


def _cells(p: ProcessInfo) -> dict[str, object]:
    return dict(
        mark=RUN_MARK if p.is_run else "",
        pid=p.pid,
        user=p.user,
        name=p.name,
        rss=units.size(p.rss),
        cpu=f"{p.cpu_percent:.1f}",
        command=p.command,
    )


class ProcessTable(RowTable):
    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.processes: dict[int, ProcessInfo] = {}
        self.sort_column = "rss"

    def on_mount(self) -> None:
        for key, label, width, _, _ in COLUMNS:
            self.add_column(label, key=key, width=width)

    def show(self, processes: tuple[ProcessInfo, ...]) -> None:
        selected = self.selected_pid()
        fresh = {p.pid: p for p in processes}
        for pid in [pid for pid in self.processes if pid not in fresh]:
            self.remove_row(str(pid))
        for pid, proc in fresh.items():
            old = self.processes.get(pid)
            if old is None:
                cells = _cells(proc)
                self.add_row(*(cells[key] for key, *_ in COLUMNS), key=str(pid))
            elif old != proc:
                old_cells = _cells(old)
                for column, value in _cells(proc).items():
                    if old_cells[column] != value:
                        self.update_cell(str(pid), column, value)
        self.processes = fresh
        self._sort(selected)

    def selected_pid(self) -> int | None:
        if not self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return int_key(row_key)

    def select_pid(self, pid: int) -> None:
        self.move_cursor(row=self.get_row_index(str(pid)))

    def cycle_sort(self) -> str:
        keys = [key for key, *_ in SORTABLE]
        self.sort_by(keys[(keys.index(self.sort_column) + 1) % len(keys)])
        return self.sort_column

    def sort_by(self, column: str) -> None:
        if column in (key for key, *_ in SORTABLE):
            self.sort_column = column
            self._sort(self.selected_pid())

    def on_data_table_header_selected(self, event: RowTable.HeaderSelected) -> None:
        column = event.column_key.value
        if column is not None:  # always: every column is added with its key
            self.sort_by(column)

    def _sort(self, keep_pid: int | None) -> None:
        *_, field, largest_first = next(c for c in COLUMNS if c[0] == self.sort_column)
        processes = self.processes
        order = sorted(processes, key=lambda pid: getattr(processes[pid], field))
        order = order[::-1] if largest_first else order
        if [int_key(row.key) for row in self.ordered_rows] == order:
            return  # sorting re-renders every row: only when the order changed
        self.sort("pid", key=lambda pid: getattr(processes[pid], field), reverse=largest_first)
        if keep_pid in processes:
            self.select_pid(keep_pid)
