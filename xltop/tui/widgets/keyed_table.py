"""KeyedTable: a RowTable of items keyed by id (a pid, a Ray node or actor id), sortable.

`show(items)` updates a row that stays cell by cell, puts a row that appears in the place of one
that goes (else adds or removes one); the rows follow the sort column (click a header, or
`cycle_sort`), unknown values last, and the cursor stays on the same item when they re-sort. A
filter (`set_filter`) keeps the items whose searchable columns hold its text; like the sort, it
holds across `show`s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from xltop.tui.widgets.row_table import RowTable

Item = TypeVar("Item")
Cell = str | int


@dataclass(frozen=True)
class Row(Generic[Item]):
    """A row as shown: its key, its item and, in a tree view, the branch drawn before it."""

    key: str
    item: Item
    branch: str = ""


@dataclass(frozen=True)
class Column(Generic[Item]):
    key: str
    label: str
    width: int | None  # fixed: no width recalculation per tick; None = the rest
    cell: Callable[[Item], Cell]  # what the column shows of an item
    order: Callable[[Item], Any] | None = None  # what it sorts by (None: not sortable)
    largest_first: bool = False
    searchable: bool = False  # the filter looks for its text in this column
    branch: bool = False  # a tree view draws each row's branch at the start of this column


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
        self.sort_column = sort_column
        self.filter_text = ""
        self.latest: tuple[Item, ...] = ()  # the items of the last `show`, filtered out or not
        self.shown: dict[str, Row[Item]] = {}
        self.items: dict[str, Item] = {}  # the items shown, by key

    def on_mount(self) -> None:
        for column in self.spec.values():
            self.add_column(column.label, key=column.key, width=column.width)

    def show(self, items: Iterable[Item]) -> None:
        self.latest = tuple(items)
        self._update()

    def set_filter(self, text: str) -> None:
        """Show only the items whose searchable columns hold `text` (any case); "" shows all."""
        self.filter_text = text
        self._update()

    def matches(self, item: Item) -> bool:
        needle = self.filter_text.casefold()
        return not needle or any(
            needle in str(column.cell(item)).casefold()
            for column in self.spec.values()
            if column.searchable
        )

    def in_order(self, items: list[Item]) -> list[Row[Item]]:
        """The rows to show, in order: here by the sort column, unknown values last."""
        column = self.spec[self.sort_column]
        order = column.order
        if order is None:  # never: sort_by takes sortable columns only
            return [Row(self.row_key_of(item), item) for item in items]
        values = [(order(item), item) for item in items]
        known = sorted((pair for pair in values if pair[0] is not None),
                       key=lambda pair: pair[0], reverse=column.largest_first)  # fmt: skip
        unknown = [pair for pair in values if pair[0] is None]
        return [Row(self.row_key_of(item), item) for _, item in known + unknown]

    def _update(self) -> None:
        """Show `latest` as filtered and arranged now: rows by key, changed cells only."""
        selected = self.selected_key()
        rows = {row.key: row for row in self.in_order([i for i in self.latest if self.matches(i)])}
        gone = [key for key in self.shown if key not in rows]
        new = [key for key in rows if key not in self.shown]
        # a row that comes takes the place of one that goes: no layout, one line repainted
        for old_key, key in zip(gone, new, strict=False):
            self.replace_row(old_key, key, *self._cells(rows[key]).values())
        for key in gone[len(new) :]:
            self.remove_row(key)
        for key in new[len(gone) :]:
            self.add_row(*self._cells(rows[key]).values(), key=key)
        for key, row in rows.items():
            old = self.shown.get(key)
            if old is not None and old != row:
                before = self._cells(old)
                for column_key, value in self._cells(row).items():
                    if before[column_key] != value:
                        self.update_cell(key, column_key, value)
        self.shown = rows
        self.items = {key: row.item for key, row in rows.items()}
        self._place(list(rows), selected)

    def _cells(self, row: Row[Item]) -> dict[str, Cell]:
        return {
            key: f"{row.branch}{column.cell(row.item)}" if column.branch and row.branch
            else column.cell(row.item)
            for key, column in self.spec.items()
        }  # fmt: skip

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
            self._update()

    def on_data_table_header_selected(self, event: RowTable.HeaderSelected) -> None:
        column = event.column_key.value
        if column is not None:  # always: every column is added with its key
            self.sort_by(column)

    def _place(self, keys: list[str], keep: str | None) -> None:
        """Put the rows in the order of `keys`, the cursor on `keep` if it is still shown."""
        if [row.key.value for row in self.ordered_rows] == keys:
            return  # ordering re-renders every row: only when the order changed
        self.order_rows(keys)
        if keep in self.items:
            self.select_key(keep)


class AppearingTable(KeyedTable[Item]):
    """A KeyedTable hidden until it first has a row (what a run may or may not report: a user
    loop's scalars, a Ray run's workers); once shown it stays, as such rows stay with the run."""

    DEFAULT_CSS = """
    AppearingTable {
        display: none;
        height: auto;
        max-height: 25%;
        border-top: hkey $primary-background;
    }
    """

    def __init__(self, columns: Sequence[Column[Item]], **kwargs: Any) -> None:
        super().__init__(columns, **kwargs)
        self.cursor_type = "none"

    def show(self, items: Iterable[Item]) -> None:
        items = tuple(items)
        if items:
            self.display = True
        super().show(items)
