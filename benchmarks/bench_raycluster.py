"""What watching a Ray cluster costs: xltop.raycluster against a real local 2-node cluster.

1. One poll, median ms: the State API's node and actor lists (every tick), one node's dashboard
   detail (every 5 s), and a whole poll with the details.
2. The poller's own CPU at a 1 s interval over S seconds, as a percent of one core, and the
   dashboard's CPU (its head process and the module processes it forks) over an idle stretch
   with no poller and over the polled stretch: what the cluster pays for being watched.
3. The whole `xltop --ray URL --headless` process at a 1 s interval (the machine and the
   cluster, a CSV row a tick) over S seconds: target < 1.5% of one core.

    .venv/bin/python benchmarks/bench_raycluster.py [--actors 20] [--seconds 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil
from bench_monitor import bench_headless_cpu, median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_helpers import LocalRayCluster, ray_missing  # noqa: E402

from xltop.raycluster import NodeDetail, RayCluster, _state_api_rows  # noqa: E402

DRIVER = """
import sys, time
import ray

ray.init(address=sys.argv[1])


@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1


actors = [Idle.options(name=f"idle{i}", scheduling_strategy="SPREAD").remote()
          for i in range({actors})]
ray.get([actor.ping.remote() for actor in actors])
print("ready", flush=True)
while True:
    time.sleep(60)
"""


def dashboard_processes(head: psutil.Process) -> list[psutil.Process]:
    """The dashboard head process (dashboard.py) and every process below it."""
    for proc in head.children(recursive=True):
        if any(part.endswith("dashboard/dashboard.py") for part in proc.cmdline()):
            return [proc, *proc.children(recursive=True)]
    raise RuntimeError("no dashboard.py under the head's `ray start`")


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def bench_poll(url: str, node_ids: list[str], repeats: int) -> None:
    lists = median_ms(lambda: (_state_api_rows(url, "nodes", None),
                               _state_api_rows(url, "actors", None)), repeats)  # fmt: skip
    detail = median_ms(lambda: NodeDetail.fetch(url, node_ids[0], None), repeats)
    source = RayCluster(url, interval=3600.0)  # its thread polls once, then sleeps

    def whole_poll() -> None:
        source._next_detail_poll = 0.0  # details every time: the worst tick
        source._poll(time.monotonic())

    whole = median_ms(whole_poll, repeats)
    source.close()
    print(f"one poll, median of {repeats}:")
    print(f"  node and actor lists (every tick)  {lists:6.2f} ms")
    print(f"  one node's detail (every 5 s)      {detail:6.2f} ms")
    print(f"  whole poll with {len(node_ids)} nodes' details     {whole:6.2f} ms")


def bench_cpu(url: str, dashboard: list[psutil.Process], seconds: float) -> None:
    d0 = cpu_seconds(dashboard)
    time.sleep(seconds)
    idle = (cpu_seconds(dashboard) - d0) / seconds * 100

    source = RayCluster(url, interval=1.0)
    assert source.wait_polled(10), source.sample().error
    time.sleep(2.0)  # past the first polls
    t0, c0, d0 = time.monotonic(), time.process_time(), cpu_seconds(dashboard)
    while time.monotonic() - t0 < seconds:
        state = source.sample()  # what the monitor does each tick
        source.events()
        time.sleep(1.0)
    elapsed = time.monotonic() - t0
    poller = (time.process_time() - c0) / elapsed * 100
    polled = (cpu_seconds(dashboard) - d0) / elapsed * 100
    source.close()
    print(f"at a 1 s interval, {elapsed:.0f} s ({len(state.nodes)} nodes, "
          f"{len(state.actors)} actors, reachable={state.reachable}):")  # fmt: skip
    print(f"  poller (this process)          {poller:5.2f}% of one core")
    print(f"  dashboard, nobody polling      {idle:5.2f}% of one core")
    print(f"  dashboard, polled each second  {polled:5.2f}% of one core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if reason := ray_missing():
        print(f"skipped: {reason}")  # Ray is an optional extra: not a failed benchmark
        return
    print(f"machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total >> 30} GiB")
    cluster = LocalRayCluster()
    try:
        head = cluster.start_head()
        cluster.add_node()
        cluster.start_driver(DRIVER.replace("{actors}", str(args.actors)))
        source = RayCluster(cluster.url)
        deadline = time.monotonic() + 120  # Ray's agents list a new worker after 5-20 s
        while len([a for a in source.sample().actors if a.rss]) < args.actors:
            if time.monotonic() > deadline:
                sys.exit(f"actors without RSS after 120 s: {source.sample()}")
            time.sleep(0.5)
        node_ids = [node.node_id for node in source.sample().nodes]
        source.close()
        bench_poll(cluster.url, node_ids, args.repeats)
        bench_cpu(cluster.url, dashboard_processes(psutil.Process(head.pid)), args.seconds)
        bench_headless_cpu(args.seconds, watch=("--ray", cluster.url), target="< 1.5%")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
