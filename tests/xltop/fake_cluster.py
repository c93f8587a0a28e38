"""A recorded Ray cluster for the Ray panel's snapshot test: ClusterStates as formulas of the
tick number (fake_source.py's way), so two runs draw the same screen. A head and a worker node
on two hosts, a dead third node, and actors in each of Ray's states, one restarted, one dead.
"""

from __future__ import annotations

import dataclasses

from fake_source import START, FakeMonitor

from xltop.snapshot import ClusterActor, ClusterNode, ClusterState, Snapshot
from xltop.units import MIB

GIB = 1024 * MIB
ADDRESS = "http://10.0.0.1:8265"
HEAD, WORKER, GONE = ("a1" * 28, "b2" * 28, "c3" * 28)  # Ray's ids: 56 hex digits
OBJECT_STORE = 2 * GIB


def fake_nodes(k: int) -> tuple[ClusterNode, ...]:
    def node(node_id: str, ip: str, is_head: bool, cpu: float, used: int) -> ClusterNode:
        return ClusterNode(node_id, ip, is_head, alive=True, state_message=None, cpus=8.0,
                           gpus=0.0, object_store_total=OBJECT_STORE, cpu_percent=cpu,
                           memory_used=used, memory_total=64 * GIB,
                           object_store_used=(40 + k) * MIB)  # fmt: skip

    gone = ClusterNode(GONE, "10.0.0.3", False, alive=False, cpus=8.0, gpus=1.0,
                       state_message="Raylet exited: the node was terminated",
                       object_store_total=OBJECT_STORE)  # fmt: skip
    return (node(HEAD, "10.0.0.1", True, 35.0 + k % 5, (20 + k // 10) * GIB),
            node(WORKER, "10.0.0.2", False, 80.0, 41 * GIB), gone)  # fmt: skip


def fake_actors(k: int) -> tuple[ClusterActor, ...]:
    def worker(i: int, node_id: str) -> ClusterActor:
        return ClusterActor(f"{i:02d}" * 16, "StageWorker", f"stage{i}", "ALIVE", 5100 + i,
                            node_id, num_restarts=0, death_cause=None,
                            rss=(1500 + 100 * i + k) * MIB, cpu_percent=95.0 + i)  # fmt: skip

    return (
        *(worker(i, HEAD if i < 2 else WORKER) for i in range(4)),
        ClusterActor("f0" * 16, "Phoenix", "phoenix", "ALIVE", 5200, WORKER, num_restarts=2,
                     death_cause=None, rss=300 * MIB, cpu_percent=0.5),
        ClusterActor("e1" * 16, "Loader", "", "PENDING_CREATION", None, None, num_restarts=0,
                     death_cause=None),
        ClusterActor("d2" * 16, "Pinned", "right", "DEAD", 5300, GONE, num_restarts=0,
                     death_cause="NODE_DIED: The actor died because its node has died"),
    )  # fmt: skip


def fake_cluster(k: int) -> ClusterState:
    return ClusterState(ADDRESS, reachable=True, nodes=fake_nodes(k), actors=fake_actors(k),
                        polled_at=START + k)  # fmt: skip


UNREACHABLE = ClusterState(
    ADDRESS,
    reachable=False,
    unreachable_since=START,
    error=f"ray cluster at {ADDRESS} unreachable since 09:15:00 (Connection refused)",
)


class FakeClusterMonitor(FakeMonitor):
    """FakeMonitor's Snapshots, watching the recorded cluster too."""

    def tick(self) -> Snapshot:
        snapshot = super().tick()
        return dataclasses.replace(snapshot, ray=fake_cluster(self._k - 1))
