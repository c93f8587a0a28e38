"""`xltop --ray` on a real two-node cluster (conftest.ray_cluster: one for this module, ~10 s to
start): the CLI's modes, the CSV's cluster columns, the Ray panel, and a bad or silent address.

In file order: the last test SIGKILLs the restartable actor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import jsonschema
import pytest
from polling import wait_until
from ray_helpers import RunningCluster, three_actors_listed
from test_app import pilot_test, until
from test_e2e_tmux import XLTOP, Tmux
from xltop_helpers import read_rows, run_xltop, wait_for_rows

from xltop.csvlog import CLUSTER_COLUMNS, snapshot_to_row
from xltop.monitor import Monitor
from xltop.raycluster import RayCluster
from xltop.sources import SystemSource
from xltop.tui.app import XltopApp
from xltop.tui.widgets.processes import ProcessTable
from xltop.tui.widgets.ray_panel import RayPanel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_settings")]

SCHEMA = json.loads((Path(__file__).parent / "snapshot_schema.json").read_text())
ACTORS = {"left", "right", "phoenix"}


@pytest.fixture(scope="module")
def cluster(ray_cluster) -> RunningCluster:
    """The module's cluster once Ray's agents list every actor's worker (5-20 s after start)."""
    source = RayCluster(ray_cluster.cluster.url, interval=0.5)
    try:
        wait_until(lambda: three_actors_listed(source.sample()), 60, lambda: str(source.sample()))
    finally:
        source.close()
    return ray_cluster


def silent_address() -> tuple[socket.socket, str]:
    """A port that accepts connections and never answers: the hanging kind."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    return silent, f"http://127.0.0.1:{silent.getsockname()[1]}"


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.endswith("\n"), text
    return text.strip()


# --- without a cluster -------------------------------------------------------------------


def test_an_address_nobody_answers_exits_1_within_5_s_in_one_line():
    silent, url = silent_address()
    with silent:
        started = time.monotonic()
        result = run_xltop("--ray", url, "--json")
        elapsed = time.monotonic() - started
    assert result.returncode == 1 and result.stdout == ""
    assert one_line(result.stderr).startswith(f"xltop: no Ray dashboard answers at {url}: ")
    assert elapsed < 6.0, elapsed  # 5 s, and a loaded machine's interpreter start


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray", "ftp://head:1"], "xltop: not a Ray dashboard address: 'ftp://head:1'"),
        (["--ray", "head:99999"], "xltop: not a Ray dashboard address: 'head:99999'"),
        (["--ray", "head", "--ray-token-file", "/nonexistent/token"],
         "xltop: cannot read the Ray token file /nonexistent/token: "),
        (["--ray-token-file", "/etc/hostname"], "xltop: --ray-token-file needs --ray"),
        # read before the run starts its cluster (once, read at the run's hello: a traceback)
        (["--ray-run", "--ray-token-file", "/nonexistent/token"],
         "xltop: cannot read the Ray token file /nonexistent/token: "),
        (["--ray", "head", "--mem-hard", "50%"], "xltop: --mem-soft/--mem-hard act on a run; "),
    ],
)  # fmt: skip
def test_a_bad_address_or_token_file_exits_2_in_one_line(args, message):
    started = time.monotonic()
    result = run_xltop(*args, "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert one_line(result.stderr).startswith(message), result.stderr
    assert time.monotonic() - started < 10  # nothing was asked of a network


def test_a_silent_cluster_is_an_event_and_empty_csv_cells_while_the_machine_is_watched():
    silent, url = silent_address()
    monitor = Monitor(SystemSource(top_n=5), None, interval=0.2, cluster=RayCluster(url))
    with silent:
        try:
            monitor.interval = 0.5
            assert monitor.cluster.interval == 0.5  # the cluster is polled at the tick's pace
            deadline = time.monotonic() + 15  # a request times out after 2 s
            events: list[str] = []
            while not events:
                assert time.monotonic() < deadline, "no unreachable event"
                snapshot = monitor.tick()
                assert snapshot.system.total > 0  # the machine goes on being watched
                events = [e for e in snapshot.events if "unreachable since" in e]
        finally:
            monitor.close()
    assert snapshot.ray is not None and not snapshot.ray.reachable
    assert events == [snapshot.ray.error]
    row = snapshot_to_row(snapshot, 0, 0, cluster=True)
    assert [row[column] for column in CLUSTER_COLUMNS] == [None] * len(CLUSTER_COLUMNS)


# --- the module's cluster ----------------------------------------------------------------


def test_json_lists_the_nodes_and_actors_and_hosts_no_run(cluster):
    result = run_xltop("--ray", cluster.cluster.url, "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    jsonschema.validate(snapshot, SCHEMA)
    assert snapshot["run"] is None  # --ray alone watches the cluster: it starts no run
    ray = snapshot["ray"]
    assert ray["address"] == cluster.cluster.url and ray["reachable"] and ray["error"] is None
    assert [node["is_head"] for node in ray["nodes"]] == [True, False]
    assert all(node["alive"] and node["memory_total"] for node in ray["nodes"])
    actors = {actor["name"]: actor for actor in ray["actors"]}
    assert set(actors) == ACTORS
    for actor in actors.values():
        assert actor["state"] == "ALIVE" and actor["pid"] > 0 and actor["rss"] > 0


def test_once_prints_the_cluster_and_its_tables(cluster):
    result = run_xltop("--ray", cluster.cluster.url, "--once")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"ray {cluster.cluster.url}  nodes 2/2  actors 3/3  restarts 0  CPU " in result.stdout
    assert "Run: none" in lines
    nodes = next(i for i, line in enumerate(lines) if line.startswith("NODE "))
    head = lines[nodes + 1].split()
    assert head[1] == "head" and head[3] == "alive"  # id, head, ip, state
    actors = next(i for i, line in enumerate(lines) if line.startswith("ACTOR "))
    assert {line.split()[1] for line in lines[actors + 1 : actors + 4]} == ACTORS


def cluster_shown(screen: str) -> bool:
    # Any one actor: a short pane shows the actor with the largest RSS only.
    actors = [f"{kind} {name}" for kind in ("Pinned", "Phoenix") for name in ACTORS]
    return (
        "nodes 2/2 | actors 3/3" in screen
        and " head " in screen
        and any(actor in screen for actor in actors)
    )


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_tui_in_tmux_shows_the_cluster_and_quits(cluster, tmp_path):
    exit_file = tmp_path / "exit_code"
    tmux = Tmux(tmp_path)
    command = f"{XLTOP} --ray {cluster.cluster.url}; echo $? > {exit_file}"
    try:
        tmux("new-session", "-d", "-s", "xltop", "-x", "160", "-y", "50", "-c", str(tmp_path),
             command)  # fmt: skip
        screen = tmux.wait_for("the cluster, its head node and an actor", cluster_shown, 60)
        assert "processes on this machine (k kills here only)" in screen
        tmux("send-keys", "-t", "xltop", "q")
        wait_until(lambda: exit_file.exists() and exit_file.read_text().strip(), 30,
                   lambda: f"xltop to exit:\n{tmux.screen()}", interval=0.2)  # fmt: skip
    finally:
        tmux("kill-server")
    assert exit_file.read_text().strip() == "0"


def test_headless_csv_rows_carry_the_cluster_columns(cluster, xltop_process, tmp_path):
    path = tmp_path / "ray.csv"
    proc = xltop_process("--ray", cluster.cluster.url, "--headless", "--quiet",
                         "--csv", str(path), "--interval", "0.5")  # fmt: skip
    wait_for_rows(path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    rows = read_rows(path)
    columns = list(rows[0])
    start = columns.index("mlx_limit_mib") + 1  # after the base columns, before the event
    assert columns[start:] == [*CLUSTER_COLUMNS, "event"]
    for row in rows:
        assert row["run_state"] == ""  # no run
        assert (row["ray_nodes_alive"], row["ray_nodes_total"]) == ("2", "2")
        assert (row["ray_actors_alive"], row["ray_actors_total"], row["ray_restarts"]) == (
            "3", "3", "0"
        )  # fmt: skip
        assert float(row["ray_object_store_used_mib"]) >= 0
        assert 0 <= float(row["ray_cpu_pct"]) <= 100
        assert 0 < float(row["ray_memory_used_mib"]) <= float(row["total_mib"])


@pilot_test
async def test_the_ray_panel_shows_the_real_clusters_nodes_and_actors(cluster):
    source = RayCluster(cluster.cluster.url, interval=0.5)
    monitor = Monitor(SystemSource(top_n=30), None, interval=0.5, cluster=source)
    app = XltopApp(monitor, host="testhost")
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            panel = app.main_screen.query_one(RayPanel)
            nodes, actors = panel.tables()
            await until(pilot, lambda: actors.row_count == 3 and nodes.row_count == 2, "rows")
            title = str(panel.query_one("#ray-title").content)
            assert f"ray {cluster.cluster.url} | nodes 2/2 | actors 3/3 | restarts 0" in title
            processes = app.main_screen.query_one(ProcessTable)
            assert "this machine" in str(processes.border_title)
            for row in actors.ordered_rows:
                actor = actors.items[row.key.value]
                assert actor.name in ACTORS and actor.rss
                assert actors.get_cell(row.key, "pid") == actor.pid
                assert actors.get_cell(row.key, "state") == "ALIVE"
                assert actors.get_cell(row.key, "rss").endswith("MiB")
            rss = [actors.items[row.key.value].rss for row in actors.ordered_rows]
            assert rss == sorted(rss, reverse=True)  # largest first
            head = next(row.key for row in nodes.ordered_rows)
            assert nodes.get_cell(head, "node").endswith(" head")
            assert nodes.get_cell(head, "state") == "alive"
    finally:
        monitor.close()


def test_a_killed_actor_restarts_as_an_event_on_stderr_and_in_the_csv(cluster, xltop_process,
                                                                      tmp_path):  # fmt: skip
    source = RayCluster(cluster.cluster.url)
    try:
        assert source.wait_polled(10)
        phoenix = next(a for a in source.sample().actors if a.name == "phoenix")
    finally:
        source.close()
    path = tmp_path / "ray.csv"
    proc = xltop_process("--ray", cluster.cluster.url, "--headless", "--quiet",
                         "--csv", str(path), "--interval", "0.5")  # fmt: skip
    wait_for_rows(path, 1, proc)
    os.kill(phoenix.pid, signal.SIGKILL)
    event = "ray actor Phoenix phoenix restarted (restarts: 1)"

    def restart_row() -> dict[str, str] | None:
        assert proc.poll() is None, proc.communicate()
        return next((row for row in read_rows(path) if event in (row["event"] or "")), None)

    row = wait_until(restart_row, 30, f"a row with the event {event!r}")
    assert row["ray_restarts"] == "1"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert f"xltop: {event}\n" in stderr


@pytest.mark.parametrize("kind", ["a FIFO", "a character device"])
def test_a_token_file_that_is_no_regular_file_is_refused_before_it_is_read(tmp_path, kind):
    # read, a FIFO with no writer would block forever and /dev/zero never ends
    path = tmp_path / "token" if kind == "a FIFO" else "/dev/zero"
    if kind == "a FIFO":
        os.mkfifo(path)
    result = run_xltop("--ray", "head", "--ray-token-file", str(path), "--json", timeout=20)
    assert result.returncode == 2 and result.stdout == ""
    assert (
        one_line(result.stderr)
        == f"xltop: cannot read the Ray token file {path}: not a regular file"
    )
