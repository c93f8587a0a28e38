"""A Ray run's stage actors (ttt_runtime.ray_workers), one row per stage and replica, as the run
reports them: the blocks each owns, where it runs, its process's memory, its forward, backward
and waiting time over the last step, the bytes it moved, and its restarts. Hidden until a run
reports workers (a one-process run has none).

Rows are keyed by stage and replica (a KeyedTable): a restarted actor keeps its row, with its new
pid and one more restart.
"""

from __future__ import annotations

from typing import Any

from ttt_runtime.protocol import WorkerFigures
from xltop import units
from xltop.snapshot import RunInfo
from xltop.tui.widgets.keyed_table import AppearingTable, Column


def blocks_text(worker: WorkerFigures) -> str:
    if not worker.blocks:  # a replayed CSV keeps none
        return units.MISSING
    first, last = worker.blocks[0], worker.blocks[-1]
    return str(first) if first == last else f"{first}-{last}"


def _ms(value: float | None) -> str:
    return units.number(value, 3)


COLUMNS: tuple[Column[WorkerFigures], ...] = (
    Column("stage", "stage", 5, lambda w: f"{w.stage}.{w.replica}",
           order=lambda w: (w.stage, w.replica)),
    Column("blocks", "blocks", 6, blocks_text, order=lambda w: w.blocks),
    Column("node", "node", 15, lambda w: w.node_ip, order=lambda w: w.node_ip),
    Column("pid", "pid", 7, lambda w: w.pid, order=lambda w: w.pid),
    Column("rss", "RSS", 8, lambda w: units.size(w.rss), order=lambda w: w.rss,
           largest_first=True),
    Column("active", "MLX act", 8, lambda w: units.size(w.active), order=lambda w: w.active,
           largest_first=True),
    Column("peak", "MLX peak", 8, lambda w: units.size(w.peak), order=lambda w: w.peak,
           largest_first=True),
    Column("fwd", "fwd ms", 7, lambda w: _ms(w.fwd_ms), order=lambda w: w.fwd_ms,
           largest_first=True),
    Column("bwd", "bwd ms", 7, lambda w: _ms(w.bwd_ms), order=lambda w: w.bwd_ms,
           largest_first=True),
    Column("wait", "wait ms", 7, lambda w: _ms(w.wait_ms), order=lambda w: w.wait_ms,
           largest_first=True),
    Column("sync", "sync ms", 7, lambda w: _ms(w.sync_ms), order=lambda w: w.sync_ms,
           largest_first=True),
    Column("moved", "sent/recv", 17, lambda w: f"{units.size(w.sent)}/{units.size(w.received)}",
           order=lambda w: w.sent + w.received, largest_first=True),
    Column("restarts", "restarts", None, lambda w: w.restarts, order=lambda w: w.restarts,
           largest_first=True),
)  # fmt: skip


class WorkersTable(AppearingTable[WorkerFigures]):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            COLUMNS, key=lambda w: f"{w.stage}.{w.replica}", sort_column="stage", **kwargs
        )

    def show_run(self, run: RunInfo | None) -> None:
        self.show(run.workers if run is not None else ())
