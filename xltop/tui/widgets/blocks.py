"""Per-block table: latency p50/p95 over a window, and each block's TTT layer fast-weight stats.

Rows are keyed by block index and updated cell by cell (no clear-and-rebuild: no flicker).
Latencies are collected once per sampled step (the run times blocks on a schedule).
"""

from __future__ import annotations

import math
from collections import deque

from xltop import units
from xltop.snapshot import RunInfo
from xltop.tui.widgets.row_table import RowTable, int_key

WINDOW = 60  # sampled steps kept per block
# column key, label, width (fixed: no width recalculation per tick)
COLUMNS = (
    ("block", "blk", 3),
    ("fwd50", "fwd50ms", 7),
    ("fwd95", "fwd95", 5),
    ("bwd50", "bwd50ms", 7),
    ("bwd95", "bwd95", 5),
    ("wnorm", "|W|", 6),
    ("unorm", "|dW|", 6),
    ("drift", "drift", 6),
    ("inner", "inner loss before>after", 23),
)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


class BlocksTable(RowTable):
    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="none", zebra_stripes=True, **kwargs)
        self.fwd: list[deque[float]] = []
        self.bwd: list[deque[float]] = []
        self._sampled: int | None = None

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def record(self, run: RunInfo | None) -> None:
        """Add the run's per-block latencies, once per sampled step."""
        if run is None or run.sampled_step is None or run.sampled_step == self._sampled:
            return
        self._sampled = run.sampled_step
        while len(self.fwd) < len(run.blocks):
            self.fwd.append(deque(maxlen=WINDOW))
            self.bwd.append(deque(maxlen=WINDOW))
        for i, block in enumerate(run.blocks):
            if block.fwd_ms is not None:
                self.fwd[i].append(block.fwd_ms)
            if block.bwd_ms is not None:
                self.bwd[i].append(block.bwd_ms)

    def show(self, run: RunInfo | None) -> None:
        n = 0
        if run is not None:
            n = max(len(run.blocks), len(run.layers))
            for i in range(n):
                self._set_row(i, self._cells(run, i))
        for key in [k for k in self.rows if int_key(k) >= n]:
            self.remove_row(key)

    def _cells(self, run: RunInfo, i: int) -> dict[str, str]:
        fwd = list(self.fwd[i]) if i < len(self.fwd) else []
        bwd = list(self.bwd[i]) if i < len(self.bwd) else []
        layer = run.layers[i] if i < len(run.layers) else None
        if layer is None:
            stats = dict.fromkeys(("wnorm", "unorm", "drift", "inner"), units.MISSING)
        else:
            before = units.number(layer.inner_loss_before)
            after = units.number(layer.inner_loss_after)
            stats = dict(
                wnorm=units.number(layer.w_norm),
                unorm=units.number(layer.update_norm),
                drift=units.number(layer.drift),
                inner=f"{before} > {after}",
            )
        return dict(
            block=str(i),
            fwd50=units.ms(percentile(fwd, 50)),
            fwd95=units.ms(percentile(fwd, 95)),
            bwd50=units.ms(percentile(bwd, 50)),
            bwd95=units.ms(percentile(bwd, 95)),
            **stats,
        )

    def _set_row(self, i: int, cells: dict[str, str]) -> None:
        key = str(i)
        if key not in self.rows:
            self.add_row(*(cells[k] for k, *_ in COLUMNS), key=key)
            return
        for column, value in cells.items():
            if self.get_cell(key, column) != value:
                self.update_cell(key, column, value)
