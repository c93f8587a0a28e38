"""The extra scalars a user's own loop reports (ttt_runtime.report): one row per name, its newest
value. Hidden until a run reports one (a TTT run has none); the CSV logs them as `user_<name>`.

Rows are keyed by name (a KeyedTable): a value that changes is updated in its cell only.
"""

from __future__ import annotations

from typing import Any

from xltop import units
from xltop.snapshot import RunInfo
from xltop.tui.widgets.keyed_table import AppearingTable, Column

Scalar = tuple[str, float | None]  # (name, newest value)
COLUMNS: tuple[Column[Scalar], ...] = (
    Column("name", "user scalar", 24, lambda s: s[0], order=lambda s: s[0]),
    Column("value", "value", None, lambda s: units.number(s[1], digits=6)),
)


class UserScalarsTable(AppearingTable[Scalar]):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(COLUMNS, key=lambda s: s[0], sort_column="name", **kwargs)

    def show_run(self, run: RunInfo | None) -> None:
        self.show((run.user if run is not None else {}).items())
