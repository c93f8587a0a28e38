"""RowTable: a DataTable whose cell updates re-render only the rows they change, cheaply.

DataTable.update_cell bumps a counter that is part of every one of its render cache keys, so one
changed cell re-renders every cell of the table on the next frame: two thirds of a tick's paint.
Here an update marks its row, and the next paint drops only that row's cached renders. A one-line
cell is drawn as one Segment: Rich's pipeline (markup parsing, Padding, Styled, line splitting)
cost ~0.2 ms a cell, and it showed a command's "[...]" as markup. This leans on DataTable's
private caches (textual 8.2); tests/xltop/test_app.py checks what it draws.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from rich.cells import set_cell_size
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual._two_way_dict import TwoWayDict
from textual._types import SegmentLines
from textual.cache import LRUCache
from textual.geometry import Region
from textual.strip import Strip
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, CellType, ColumnKey, RowKey

from xltop.units import CONTROL_CHARACTERS, printable

CacheKey = TypeVar("CacheKey")
_CONTROL_OR_MARKUP = re.compile(rf"\[|{CONTROL_CHARACTERS.pattern}")


def literal(value: Any) -> Any:
    """A cell shown as written: DataTable reads a str as markup when it measures or draws it (a
    process's "[/x]" raised MarkupError and ended the app), so a str that markup or the terminal
    would misread is a Text; any other stays a str, for the one-Segment drawing below."""
    if isinstance(value, str) and _CONTROL_OR_MARKUP.search(value):
        return Text(printable(value), end="")
    return value


class RowTable(DataTable):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._changed_rows: set[RowKey] = set()

    def update_cell(
        self,
        row_key: RowKey | str,
        column_key: ColumnKey | str,
        value: CellType,
        *,
        update_width: bool = False,
    ) -> None:
        value = literal(value)
        if update_width:  # a width change re-renders everything anyway
            super().update_cell(row_key, column_key, value, update_width=True)
            return
        row = RowKey(row_key) if isinstance(row_key, str) else row_key
        column = ColumnKey(column_key) if isinstance(column_key, str) else column_key
        row_index = self._row_locations.get(row)
        if row_index is None or column not in self._column_locations:
            raise CellDoesNotExist(f"No cell exists for row_key={row!r}, column_key={column!r}.")
        self._data[row][column] = value
        self._changed_rows.add(row)
        self.refresh_row(row_index)

    def add_row(self, *cells: Any, **kwargs: Any) -> RowKey:
        return super().add_row(*map(literal, cells), **kwargs)

    def order_rows(self, keys: list[str]) -> None:
        """Put the rows in the order of `keys` (each row's key once). DataTable.sort orders by
        cell values, which need not say the order (a size shown as "1.2 GiB"); like it, this
        re-renders every row."""
        self._row_locations = TwoWayDict({RowKey(key): index for index, key in enumerate(keys)})
        self._update_count += 1
        self.refresh()

    def render_lines(self, crop: Region) -> list[Strip]:
        if self._changed_rows:
            self._forget(self._changed_rows)
            self._changed_rows = set()
        return super().render_lines(crop)

    def _forget(self, rows: set[RowKey]) -> None:
        """Drop the cached renders of `rows`; every other row's stay valid."""
        indices = {self._row_locations.get(row) for row in rows}
        _discard(self._cell_render_cache, lambda key: key[0] in rows)  # (row key, column, ...)
        _discard(self._row_render_cache, lambda key: key[0] in rows)  # (row key, line, ...)
        _discard(self._row_renderable_cache, lambda key: key[1] in indices)  # (count, row index)
        self._line_cache.clear()  # keyed by screen line: cheap to rebuild from the row caches

    def _render_cell(
        self,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool = False,
        hover: bool = False,
    ) -> SegmentLines:
        row_key = self._row_locations.get_key(row_index)
        column_key = self._column_locations.get_key(column_index)
        # Only one-line str/int cells of the body are drawn here (no key: the header row, index
        # -1, or the row labels' column).
        if (
            row_key is None
            or column_key is None
            or not isinstance(value := self._data[row_key].get(column_key), (str, int))
            or self.rows[row_key].height != 1
            or self.fixed_rows
            or self.fixed_columns
        ):
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        # The same key as DataTable's, so its invalidations (sort, resize, focus) apply here too.
        key = (row_key, column_key, base_style, cursor, hover,
               self._show_hover_cursor, self._update_count, self._pseudo_class_state)  # fmt: skip
        lines = self._cell_render_cache.get(key)
        if lines is None:
            component_style, post_style = self._get_styles_to_render_cell(
                False, False, False, hover, cursor, self.show_cursor, self._show_hover_cursor,
                self.cursor_foreground_priority == "css", self.cursor_background_priority == "css",
            )  # fmt: skip
            meta = Style.from_meta({"row": row_index, "column": column_index})
            pad = " " * self.cell_padding
            text = set_cell_size(str(value), width - 2 * len(pad))
            lines = [[Segment(pad + text + pad, base_style + meta + component_style + post_style)]]
            self._cell_render_cache[key] = lines
        return lines


def int_key(row_key: RowKey) -> int:
    """The number a row is keyed by, for tables that add each row with key=str(number)."""
    if row_key.value is None:  # never: such tables give every row its key
        raise ValueError("a row added without its number as key")
    return int(row_key.value)


def _discard(cache: LRUCache[CacheKey, Any], stale: Callable[[CacheKey], bool]) -> None:
    """Drop the entries of `cache` whose key is stale."""
    for key in [key for key in cache.keys() if stale(key)]:  # noqa: SIM118 (no __iter__)
        cache.discard(key)
