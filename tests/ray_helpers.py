"""A real local Ray cluster on 127.0.0.1, for xltop's tests and benchmarks.

Every `ray start` and driver runs in a process group of its own and is stopped by that group
(SIGTERM, then SIGKILL): never `ray stop`, which would stop every cluster of this user. Each
cluster gets a private HOME (its ~/.ray), a short temp dir (Ray's Unix sockets live under it and
their paths cap at 107 bytes) and ports of its own; `stop()` removes them all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from xltop.snapshot import ClusterState

RAY_BIN = Path(sys.executable).with_name("ray")
SHM = Path("/dev/shm")
STOP_GRACE_S = 5.0  # Ray's own shutdown on SIGTERM often takes longer: then SIGKILL

# A job with three actors for a two-node cluster of one CPU a node (argv[1]: the GCS address).
THREE_ACTORS = """
import sys, time
import ray

ray.init(address=sys.argv[1])


@ray.remote(num_cpus=1)  # each node has one CPU: "left" and "right" land on different nodes
class Pinned:
    def ping(self):
        return 1


@ray.remote(num_cpus=0, max_restarts=5)
class Phoenix:
    def ping(self):
        return 1


actors = [Pinned.options(name="left").remote(), Pinned.options(name="right").remote(),
          Phoenix.options(name="phoenix").remote()]
ray.get([actor.ping.remote() for actor in actors])
print("ready", flush=True)
while True:
    time.sleep(60)
"""


def three_actors_listed(state: ClusterState) -> bool:
    """Both nodes and THREE_ACTORS' actors, with the figures the node stats bring (Ray's agents
    list a new worker 5-20 s after it starts)."""
    return (
        state.nodes_alive == 2
        and all(node.memory_total for node in state.nodes)
        and state.actors_alive == 3
        and all(actor.rss for actor in state.actors)
    )


def ray_missing() -> str | None:
    """Why a real cluster cannot be started here, or None."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'xltop[ray]')"
    if not RAY_BIN.exists():
        return f"no `ray` command next to {sys.executable}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_leftovers() -> set[str]:
    """What Ray may leave in /dev/shm (semaphores of Compiled Graphs, plasma files)."""
    try:
        return {n for n in os.listdir(SHM) if n.startswith(("sem.", "plasma"))}
    except OSError:
        return set()


def _group_gone(proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the leader: a zombie leader keeps its group alive
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


class LocalRayCluster:
    """A head node (`start_head`), more raylets (`add_node`) and drivers (`start_driver`)."""

    def __init__(self, token: str | None = None):
        self.base = Path(tempfile.mkdtemp(prefix="xr-", dir="/tmp"))
        self.home = self.base / "home"
        self.home.mkdir()
        self.temp_dir = self.base / "ray"  # RAY_TMPDIR=base makes this Ray's default temp dir
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()  # the Ray client server takes 10001 unless told
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.token_file: Path | None = None
        if token is not None:
            self.token_file = self.base / "token"
            self.token_file.write_text(token)
        self.groups: list[subprocess.Popen] = []
        self._shm_before = _ray_leftovers()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # TMPDIR too: the dashboard's multiprocessing leaves /tmp/pymp-* behind when killed.
        env.update(HOME=str(self.home), RAY_TMPDIR=str(self.base), TMPDIR=str(self.base),
                   RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
        if self.token_file is None:
            env["RAY_AUTH_MODE"] = "disabled"
        else:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        env.pop("LD_PRELOAD", None)
        return env

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        with open(self.base / log_name, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env(), cwd=self.base,
                                    start_new_session=True)  # fmt: skip
        self.groups.append(proc)
        return proc

    def _ray_start(self, role: list[str], log_name: str) -> subprocess.Popen:
        return self._spawn(
            [str(RAY_BIN), "start", *role, "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--object-store-memory=100000000", f"--dashboard-agent-listen-port={free_port()}",
             "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats", "--block"],
            log_name,
        )  # fmt: skip

    def start_head(self, timeout: float = 90.0) -> subprocess.Popen:
        """`ray start --head` on this cluster's ports; returns once the dashboard answers."""
        proc = self._ray_start(
            ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
             f"--ray-client-server-port={self.client_port}"],
            "head.log",
        )  # fmt: skip
        self._wait(proc, "head.log", timeout, self._dashboard_answers)
        return proc

    def add_node(self, timeout: float = 90.0) -> subprocess.Popen:
        """A second raylet on this machine, joined to the head: a real second node. Returns
        once `ray start` says the node runs."""
        log_name = f"node{len(self.groups)}.log"
        proc = self._ray_start([f"--address={self.gcs_address}"], log_name)
        self._wait(proc, log_name, timeout, lambda: b"block forever" in self.log(log_name))
        return proc

    def start_driver(self, script: str, timeout: float = 120.0) -> subprocess.Popen:
        """A Ray driver running `script` with the cluster's address as argv[1]; returns once
        it prints a line "ready"."""
        path = self.base / f"driver{len(self.groups)}.py"
        path.write_text(script)
        log_name = f"{path.stem}.log"
        proc = self._spawn([sys.executable, str(path), self.gcs_address], log_name)
        self._wait(proc, log_name, timeout, lambda: b"\nready\n" in b"\n" + self.log(log_name))
        return proc

    def log(self, name: str) -> bytes:
        try:
            return (self.base / name).read_bytes()
        except OSError:
            return b""

    def _dashboard_answers(self) -> bool:
        from xltop.raycluster import check_reachable

        return check_reachable(self.url, self.token_file, timeout=1.0) is None

    def _wait(self, proc: subprocess.Popen, log_name: str, timeout: float, ready) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log(log_name)[-3000:].decode(errors="replace")
                raise RuntimeError(f"{log_name}: not ready (exit {proc.poll()}):\n{tail}")
            time.sleep(0.25)

    @staticmethod
    def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the process group `proc` leads, SIGKILL what is left after `grace` s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            if _group_gone(proc, grace):
                break
        proc.wait()

    def stop(self) -> None:
        """Stop every process group started here; remove the temp dir and Ray's /dev/shm files."""
        for proc in reversed(self.groups):
            self.stop_group(proc)
        for name in _ray_leftovers() - self._shm_before:
            with contextlib.suppress(OSError):
                (SHM / name).unlink()
        shutil.rmtree(self.base, ignore_errors=True)


class RunningCluster(NamedTuple):
    """A two-node cluster running THREE_ACTORS: the cluster and each process group's leader."""

    cluster: LocalRayCluster
    head: subprocess.Popen
    node: subprocess.Popen
    driver: subprocess.Popen
