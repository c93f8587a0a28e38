"""RowTable: a DataTable whose cell updates repaint only the rows they change, cheaply.

DataTable.update_cell bumps a counter that is part of every one of its render cache keys and
repaints the whole table, and its row rendering costs ~0.7 ms a row (a style lookup a cell): with
the blocks changing every tick that was a third of a tick's paint. Here an update repaints its own
row, and a body row of one-line str/int/plain-Text cells is drawn through the public line API
(`render_line`), one Segment a cell, in DataTable's styles (zebra, cursor), cached by what it
shows; the header, the row under the mouse (for DataTable's hover highlight) and a row with any
other cell (a styled Text) keep DataTable's own path.
Private parts used: the cell store (`_data`), its cache counter (`_update_count`), the row
order (`_row_locations`, for `order_rows` and `replace_row`) and, for `replace_row`, the rows
waiting to be measured (`_new_rows`, `_require_update_dimensions`) of textual 8;
tests/xltop/test_app.py checks what it draws, the snapshot tests how.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from rich.cells import set_cell_size
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual._two_way_dict import TwoWayDict
from textual.color import Color
from textual.geometry import Region
from textual.strip import Strip
from textual.widgets import DataTable
from textual.widgets.data_table import CellType, ColumnKey, DuplicateKey, RowKey

from xltop.units import CONTROL_CHARACTERS, printable

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
        self._drawn: dict[int, tuple[tuple, Strip]] = {}  # row index -> (what it showed, line)
        self._to_repaint: set[int] = set()  # rows whose line is marked for the next paint
        self._row_styles: _RowStyles | None = None  # looked up once, kept while they hold
        self._styled_for: object = None  # the pseudo-class state they were looked up in

    def update_cell(
        self,
        row_key: RowKey | str,
        column_key: ColumnKey | str,
        value: CellType,
        *,
        update_width: bool = False,
    ) -> None:
        value = literal(value)
        if update_width:  # a width change repaints everything anyway
            super().update_cell(row_key, column_key, value, update_width=True)
            return
        row_index = self.get_row_index(row_key)  # raises RowDoesNotExist
        column = ColumnKey(column_key) if isinstance(column_key, str) else column_key
        self.get_column_index(column)  # raises ColumnDoesNotExist
        row = RowKey(row_key) if isinstance(row_key, str) else row_key
        self._data[row][column] = value
        self._update_count += 1  # DataTable's caches (header, cursor row) follow the change
        self._repaint_row(row_index)

    def add_row(self, *cells: Any, **kwargs: Any) -> RowKey:
        return super().add_row(*map(literal, cells), **kwargs)

    def replace_row(self, old_key: str, new_key: str, *cells: Any) -> None:
        """Row `old_key` becomes row `new_key` showing `cells`, where it stands. A removed
        row lays the whole screen out again (DataTable.remove_row: ~7 ms, and the table
        repainted); when a row goes and another comes the table keeps its size, and this
        repaints one line."""
        old, new = RowKey(old_key), RowKey(new_key)
        if new in self._row_locations:
            raise DuplicateKey(f"The row key {new_key!r} already exists.")
        row_index = self.get_row_index(old)  # raises RowDoesNotExist
        order = [new if row.key == old else row.key for row in self.ordered_rows]
        self.rows[new] = dataclasses.replace(self.rows.pop(old), key=new)
        del self._data[old]
        self._data[new] = {
            column.key: literal(cell)
            for column, cell in zip_longest(self.ordered_columns, cells)
        }  # fmt: skip
        self._row_locations = TwoWayDict({key: index for index, key in enumerate(order)})
        # as add_row: an auto-width column is measured against the new cells when idle
        self._new_rows.add(new)
        self._require_update_dimensions = True
        self.check_idle()
        self._update_count += 1
        self._repaint_row(row_index)

    def _repaint_row(self, row_index: int) -> None:
        """Mark a row's line for the next paint, once whatever its changes."""
        if row_index not in self._to_repaint:
            self._to_repaint.add(row_index)
            header = self.header_height if self.show_header else 0
            self.refresh(Region(0, header + row_index - self.scroll_offset.y, self.size.width, 1))

    def order_rows(self, keys: list[str]) -> None:
        """Put the rows in the order of `keys` (each row's key once). DataTable.sort orders by
        cell values, which need not say the order (a size shown as "1.2 GiB"); like it, this
        repaints every row."""
        self._row_locations = TwoWayDict({RowKey(key): index for index, key in enumerate(keys)})
        self._update_count += 1
        self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._forget_styles()  # a new theme or CSS: every line's colours may change

    def render_lines(self, crop: Region) -> list[Strip]:
        self._to_repaint.clear()
        state = self.get_pseudo_class_state()  # focus, hover...: the cursor's colours follow
        if state != self._styled_for:
            self._forget_styles()
            self._styled_for = state
        return super().render_lines(crop)

    def _forget_styles(self) -> None:
        self._row_styles = None
        self._drawn.clear()

    def render_line(self, y: int) -> Strip:
        header = self.header_height if self.show_header else 0
        row_index = y - header + self.scroll_offset.y
        plain = (
            y >= header
            and 0 <= row_index < self.row_count
            and not (self.fixed_rows or self.fixed_columns)
            and self.cursor_type in ("row", "none")
            # the row under the mouse may carry DataTable's hover highlight
            and not (
                self.cursor_type == "row" and self.is_mouse_over and row_index == self.hover_row
            )
        )
        if not plain:
            return super().render_line(y)
        row = self.ordered_rows[row_index]
        cells = self.get_row(row.key)
        if row.height != 1 or row.label is not None or not _one_line(cells):
            return super().render_line(y)
        cursor = self.cursor_type == "row" and self.show_cursor and row_index == self.cursor_row
        widths = tuple(column.get_render_width(self) for column in self.ordered_columns)
        shown = (tuple(cells), cursor, widths, self.size.width, self.scroll_offset.x)
        drawn = self._drawn.get(row_index)
        if drawn is not None and drawn[0] == shown:
            return drawn[1]
        line = self._draw_row(row_index, cells, widths, cursor)
        self._drawn[row_index] = (shown, line)
        return line

    def _draw_row(
        self, row_index: int, cells: list[Any], widths: tuple[int, ...], cursor: bool
    ) -> Strip:
        """A plain row as DataTable draws it: its zebra style (and the cursor's), the cells
        padded to their column widths, the rest of the line in the row's style; each cell's
        meta says where a click lands."""
        styles = self._styles()
        odd = self.zebra_stripes and row_index % 2
        cell_style, rest_style = (styles.odd if odd else styles.even)[cursor]
        pad = " " * self.cell_padding
        segments = [
            Segment(pad + set_cell_size(str(cell), width - 2 * len(pad)) + pad,
                    cell_style + Style.from_meta({"row": row_index, "column": column_index}))
            for column_index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]  # fmt: skip
        rest = max(0, self.size.width - sum(widths))
        meta = Style.from_meta({"row": row_index, "column": 0, "out_of_bounds": True})
        segments.append(Segment(" " * rest, rest_style + meta))
        scroll_x, width = self.scroll_offset.x, self.size.width
        line = Strip(segments).crop(scroll_x, scroll_x + width)
        return line.adjust_cell_length(width, styles.base)

    def _styles(self) -> _RowStyles:
        """The rows' styles, looked up once while they hold (each lookup walks the CSS)."""
        if self._row_styles is None:
            base = self.rich_style
            if self.zebra_stripes:
                even = self.get_component_styles("datatable--even-row").rich_style
                odd = self.get_component_styles("datatable--odd-row").rich_style
            else:
                even = odd = base
            cursor = self.get_component_rich_style("datatable--cursor")
            priority = Style.null()  # which of the cursor's colours win over the cell's
            if self.cursor_foreground_priority == "css":
                priority += Style.from_color(color=cursor.color)
            if self.cursor_background_priority == "css":
                priority += Style.from_color(bgcolor=cursor.bgcolor)
            extend = self._extension()

            def pair(row: Style) -> tuple[tuple[Style, Style], tuple[Style, Style]]:
                return (row, extend(row)), (row + cursor + priority, row + cursor)

            self._row_styles = _RowStyles(base, pair(even), pair(odd))
        return self._row_styles

    def _extension(self) -> Callable[[Style], Style]:
        """The style past the last column, from a row's style: DataTable's own rule."""
        if self.cursor_type == "row":
            return lambda style: style
        background = self.background_colors[1]

        def faded(style: Style) -> Style:
            if style.bgcolor is None:
                return Style.from_color(style.color, style.bgcolor)
            colour = Color.from_rich_color(style.bgcolor).blend(background, factor=0.25)
            return Style.from_color(color=style.color, bgcolor=colour.rich_color)

        return faded


@dataclass(frozen=True)
class _RowStyles:
    """(cells' style, the rest of the line's style), off and on the cursor, by zebra stripe."""

    base: Style
    even: tuple[tuple[Style, Style], tuple[Style, Style]]
    odd: tuple[tuple[Style, Style], tuple[Style, Style]]


def _one_line(cells: list[Any]) -> bool:
    """Cells drawn as their text: str, int, and unstyled Text (what `literal` makes)."""
    return all(
        (isinstance(cell, (str, int)) or _plain_text(cell)) and "\n" not in str(cell)
        for cell in cells
    )


def _plain_text(cell: Any) -> bool:
    return isinstance(cell, Text) and not cell.spans and not cell.style


def int_key(row_key: RowKey) -> int:
    """The number a row is keyed by, for tables that add each row with key=str(number)."""
    if row_key.value is None:  # never: such tables give every row its key
        raise ValueError("a row added without its number as key")
    return int(row_key.value)
