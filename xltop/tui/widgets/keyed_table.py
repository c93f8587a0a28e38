"""KeyedTable: a RowTable of items keyed by id (a pid, a Ray node or actor id), sortable.

`show(items)` updates a row that stays cell by cell, adds a row that appears and removes one that
goes; the rows follow the sort column (click a header, or `cycle_sort`), unknown values last,
and the cursor stays on the same item when they re-sort.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from xltop.tui.widgets.row_table import RowTable

Item = TypeVar("Item")
Cell = str | int


@dataclass(frozen=True)
class Column(Generic[Item]):
    key: str
    label: str
    width: int | None  # fixed: no width recalculation per tick; None = the rest
    cell: Callable[[Item], Cell]  # what the column shows of an item
    order: Callable[[Item], Any] | None = None  # what it sorts by (None: not sortable)
    largest_first: bool = False


class KeyedTable(RowTable, Generic[Item]):
    def __init__(
        self,
        columns: Sequence[Column[Item]],
        key: Callable[[Item], str],
        sort_column: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.spec = {column.key: column for column in columns}
        self.row_key_of = key
        self.items: dict[str, Item] = {}
        self.sort_column = sort_column

    def on_mount(self) -> None:
        for column in self.spec.values():
            self.add_column(column.label, key=column.key, width=column.width)

    def show(self, items: Iterable[Item]) -> None:
        selected = self.selected_key()
        fresh = {self.row_key_of(item): item for item in items}
        for key in [key for key in self.items if key not in fresh]:
            self.remove_row(key)
        for key, item in fresh.items():
            old = self.items.get(key)
            if old is None:
                self.add_row(*(column.cell(item) for column in self.spec.values()), key=key)
            elif old != item:
                for column in self.spec.values():
                    value = column.cell(item)
                    if column.cell(old) != value:
                        self.update_cell(key, column.key, value)
        self.items = fresh
        self._sort(selected)

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return row_key.value

    def select_key(self, key: str) -> None:
        self.move_cursor(row=self.get_row_index(key))

    def sortable(self) -> list[str]:
        return [key for key, column in self.spec.items() if column.order is not None]

    def cycle_sort(self) -> str:
        keys = self.sortable()
        self.sort_by(keys[(keys.index(self.sort_column) + 1) % len(keys)])
        return self.sort_column

    def sort_by(self, column: str) -> None:
        if column in self.sortable():
            self.sort_column = column
            self._sort(self.selected_key())

    def on_data_table_header_selected(self, event: RowTable.HeaderSelected) -> None:
        column = event.column_key.value
        if column is not None:  # always: every column is added with its key
            self.sort_by(column)

    def _sort(self, keep: str | None) -> None:
        column = self.spec[self.sort_column]
        order = column.order
        if order is None:  # never: sort_by takes sortable columns only
            return
        values = {key: order(item) for key, item in self.items.items()}
        known = sorted((key for key in values if values[key] is not None),
                       key=values.__getitem__, reverse=column.largest_first)  # fmt: skip
        keys = known + [key for key in values if values[key] is None]
        if [row.key.value for row in self.ordered_rows] == keys:
            return  # ordering re-renders every row: only when the order changed
        self.order_rows(keys)
        if keep in self.items:
            self.select_key(keep)
