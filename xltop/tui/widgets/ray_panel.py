"""The Ray panel: the cluster xltop watches (`--ray`), its nodes and its actors.

A title line sums the cluster up, or says since when it is unreachable; the nodes and actors
tables are KeyedTables (rows by node or actor id, sorted by a header click). Node figures are
the host's (two nodes on one machine show the same); an actor's RSS and CPU are its worker
process's. The actors run anywhere on the cluster: `k` kills from the processes table, on this
machine only.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from ttt_runtime.protocol import WorkerFigures
from xltop import units
from xltop.snapshot import SHORT_ID, ClusterActor, ClusterNode, ClusterState
from xltop.table import cluster_line
from xltop.tui.widgets.keyed_table import Column, KeyedTable
from xltop.tui.widgets.workers import blocks_text

# Ray's two long actor states, shortened to fit the column (JSON keeps Ray's words)
SHORT_STATE = {"DEPENDENCIES_UNREADY": "UNREADY", "PENDING_CREATION": "PENDING"}


def _percent(value: float | None) -> str:
    return units.MISSING if value is None else f"{value:.0f}"


def _used_of(used: int | None, total: int | None) -> str:
    return f"{units.size(used)}/{units.size(total)}"


NODE_COLUMNS: tuple[Column[ClusterNode], ...] = (
    Column("node", "node", 13, lambda n: n.label, order=lambda n: (not n.is_head, n.node_id)),
    Column("ip", "ip", 15, lambda n: n.ip, order=lambda n: n.ip),
    Column("state", "state", 5, lambda n: "alive" if n.alive else "dead",
           order=lambda n: n.alive, largest_first=True),
    Column("cpu", "CPU%", 4, lambda n: _percent(n.cpu_percent), order=lambda n: n.cpu_percent,
           largest_first=True),
    Column("cores", "cores", 5, lambda n: f"{n.cpus:g}", order=lambda n: n.cpus,
           largest_first=True),
    Column("memory", "memory used/total", 17, lambda n: _used_of(n.memory_used, n.memory_total),
           order=lambda n: n.memory_used, largest_first=True),
    Column("store", "object store", 17,
           lambda n: _used_of(n.object_store_used, n.object_store_total),
           order=lambda n: n.object_store_used, largest_first=True),
    Column("gpus", "GPUs", 4, lambda n: f"{n.gpus:g}", order=lambda n: n.gpus,
           largest_first=True),
    Column("why", "", None, lambda n: n.state_message or ""),
)  # fmt: skip


def _ttt_stage(worker: WorkerFigures | None) -> str:
    """Our run's stage actor: stage.replica, its blocks and its time over the last step."""
    if worker is None:
        return ""
    ms = worker.fwd_ms + (worker.bwd_ms or 0.0)
    return f"{worker.stage}.{worker.replica}: {blocks_text(worker)}, {ms:.0f} ms"


ACTOR_COLUMNS: tuple[Column[ClusterActor], ...] = (
    Column("actor", "actor", 24, lambda a: a.label, order=lambda a: a.label),
    Column("state", "state", 10, lambda a: SHORT_STATE.get(a.state, a.state),
           order=lambda a: a.state),
    Column("pid", "pid", 7, lambda a: a.pid or units.MISSING, order=lambda a: a.pid),
    Column("node", "node", SHORT_ID, lambda a: (a.node_id or units.MISSING)[:SHORT_ID],
           order=lambda a: a.node_id),
    Column("rss", "RSS", 8, lambda a: units.size(a.rss), order=lambda a: a.rss,
           largest_first=True),
    Column("cpu", "CPU%", 5, lambda a: units.number(a.cpu_percent, 2),
           order=lambda a: a.cpu_percent, largest_first=True),
    Column("restarts", "restarts", 8, lambda a: a.num_restarts, order=lambda a: a.num_restarts,
           largest_first=True),
    Column("ttt", "TTT stage: blocks, ms", 21, lambda a: _ttt_stage(a.worker),
           order=lambda a: (a.worker.stage, a.worker.replica) if a.worker else None),
    Column("death", "death cause", None, lambda a: a.death_cause or ""),
)  # fmt: skip


def title(cluster: ClusterState) -> Text:
    """One line: the cluster summed up, or (in red) why nothing can be read from it."""
    style = "bold red" if cluster.error else "" if cluster.reachable else "dim"
    return Text(
        units.printable(cluster_line(cluster, " | ")),
        style=style,
        no_wrap=True,
        overflow="ellipsis",
    )


class RayPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="ray-title")
        yield KeyedTable(NODE_COLUMNS, key=lambda n: n.node_id, sort_column="node", id="ray-nodes")
        yield KeyedTable(ACTOR_COLUMNS, key=lambda a: a.actor_id, sort_column="rss",
                         id="ray-actors")  # fmt: skip

    def tables(self) -> tuple[KeyedTable[Any], KeyedTable[Any]]:
        """The nodes table and the actors table."""
        return self.query_one("#ray-nodes", KeyedTable), self.query_one("#ray-actors", KeyedTable)

    def show(self, cluster: ClusterState) -> None:
        self.query_one("#ray-title", Static).update(title(cluster), layout=False)
        nodes, actors = self.tables()
        nodes.show(cluster.nodes)
        actors.show(cluster.actors)
