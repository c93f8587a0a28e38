"""xltop.raycluster against real Ray clusters on 127.0.0.1 (ray_helpers.LocalRayCluster).

One cluster (a head, a second raylet, a driver with three named actors) serves the module's
cluster tests, in file order: the last ones stop its second node, then the whole cluster. The
token test runs first, on a cluster of its own, so that two clusters never run at once.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import signal
import socket
import threading
import time

import psutil
import pytest
from conftest import start_cluster
from ray_helpers import LocalRayCluster, three_actors_listed

from xltop.raycluster import (
    DETAIL_INTERVAL_S,
    MAX_REPLY_BYTES,
    REPLY_DEADLINE_S,
    TOKEN_HINT,
    ClusterState,
    NodeDetail,
    RayCluster,
    RayClusterError,
    check_reachable,
    dashboard_url,
    find_token,
    resolve_address,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_settings")]


@pytest.fixture
def watch():
    """Factory: a RayCluster source, closed at teardown."""
    sources: list[RayCluster] = []

    def start(*args, **kwargs) -> RayCluster:
        sources.append(RayCluster(*args, **kwargs))
        return sources[-1]

    yield start
    for source in sources:
        source.close()


def wait_for(source: RayCluster, predicate, timeout: float, events: list[str] | None = None):
    """The first state `predicate` accepts (collecting events on the way), within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        state = source.sample()
        if events is not None:
            events.extend(source.events())
        if predicate(state):
            return state
        assert time.monotonic() < deadline, f"not within {timeout} s: {state}"
        time.sleep(0.2)


def actor(state: ClusterState, name: str):
    return next(a for a in state.actors if a.name == name)


def one_line(text: str | None) -> str:
    assert text and "\n" not in text, text
    return text


# --- without a cluster -------------------------------------------------------------------


def test_dashboard_addresses_are_normalized_and_bad_ones_named_in_one_line():
    assert dashboard_url("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert dashboard_url(" http://head:9000/ ") == "http://head:9000"
    assert dashboard_url("head") == "http://head:8265"  # Ray's default dashboard port
    assert dashboard_url("[::1]:9") == "http://[::1]:9"
    bad_addresses = ("", "http://", "ftp://head:1", "head:99999", "head:0", "head:port", "a b",
                     "http://[::1", "[::1")  # fmt: skip
    for bad in bad_addresses:
        with pytest.raises(RayClusterError, match=re.escape(repr(bad))) as error:
            dashboard_url(bad)
        one_line(str(error.value))


def test_the_token_is_found_where_ray_keeps_it_and_a_named_file_wins(tmp_path, monkeypatch,
                                                                   no_ray_settings):  # fmt: skip
    assert find_token() is None
    default = no_ray_settings / ".ray" / "auth_token"
    default.parent.mkdir()
    default.write_text("from-home\n")
    assert find_token().value == "from-home"
    path_file = tmp_path / "path_token"
    path_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_file))
    assert find_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token().value == "from-env"
    assert find_token().source == "RAY_AUTH_TOKEN"  # messages name the place, never the token
    named = tmp_path / "named"
    named.write_text(" named \n")
    assert find_token(named).value == "named"

    named.write_text("\n")
    with pytest.raises(RayClusterError, match="is empty"):
        find_token(named)
    with pytest.raises(RayClusterError, match="cannot read the Ray token file .*missing"):
        find_token(tmp_path / "missing")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path))  # a folder
    with pytest.raises(RayClusterError, match="RAY_AUTH_TOKEN_PATH") as error:
        find_token()
    one_line(str(error.value))


def test_auto_without_a_local_cluster_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(RayClusterError, match="no local Ray cluster found") as error:
        resolve_address("auto")
    one_line(str(error.value))
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.7:8265")  # Ray's first choice
    assert resolve_address("auto") == "http://10.0.0.7:8265"


def test_an_address_nobody_answers_fails_within_5_s_and_never_blocks_sampling(watch):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with socket.socket() as silent:  # connects, then never answers: the hanging kind
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for url in (refused_url, silent_url):
            started = time.monotonic()
            problem = one_line(check_reachable(url))
            assert time.monotonic() - started < 6.0, problem  # 5 s, and the loaded machine
            assert problem.startswith(f"no Ray dashboard answers at {url}: ")

        source = watch(silent_url, interval=0.5)
        started = time.monotonic()
        state = source.sample()
        assert time.monotonic() - started < 0.05
        assert not state.reachable and state.nodes == () and state.error is None  # not yet
        events: list[str] = []
        state = wait_for(source, lambda s: s.error is not None, timeout=10, events=events)
        assert re.fullmatch(rf"ray cluster at {silent_url} unreachable since "
                            r"\d\d:\d\d:\d\d \(.*timed out.*\)", state.error)  # fmt: skip
        assert events == [state.error]


def test_a_web_server_that_is_not_a_ray_dashboard_is_named(tmp_path):
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "version").write_text("{}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=tmp_path)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert check_reachable(url) == f"{url} answers, but not as a Ray dashboard"
        (tmp_path / "api" / "version").unlink()
        assert check_reachable(url) == f"no Ray dashboard answers at {url}: HTTP 404 File not found"
        server.shutdown()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 200 {} and keeps each request's Authorization header in the server's `seen`."""

    def do_GET(self):
        self.server.seen.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(tmp_path):
    # a dashboard's API never redirects; following one would hand the token to another host
    token = tmp_path / "token"
    token.write_text("secret-token")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder) as elsewhere:
        elsewhere.seen = []
        target = f"http://127.0.0.1:{elsewhere.server_address[1]}"

        class Redirect(_Recorder):
            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", target + self.path)
                self.end_headers()

        with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect) as dashboard:
            for server in (elsewhere, dashboard):
                threading.Thread(target=server.serve_forever, daemon=True).start()
            url = f"http://127.0.0.1:{dashboard.server_address[1]}"
            problem = check_reachable(url, token)
            dashboard.shutdown()
        elsewhere.shutdown()
    assert (
        problem == f"no Ray dashboard answers at {url}: HTTP 302 redirects to {target}/api/version"
    )
    assert elsewhere.seen == []


def test_a_reply_too_big_for_any_cluster_is_not_read_to_its_end():
    # a stream that never ends would otherwise fill xltop's memory; this one ends past the cap
    chunk = b" " * (1 << 20)

    class Endless(_Recorder):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):  # xltop hangs up at the cap
                for _ in range(MAX_REPLY_BYTES // len(chunk) + 2):
                    self.wfile.write(chunk)

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        problem = check_reachable(url, timeout=30)
        server.shutdown()
    assert problem == f"no Ray dashboard answers at {url}: a reply over {MAX_REPLY_BYTES} bytes"


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_reply_that_trickles_in_is_given_up_like_a_silent_one(watch, where):
    # a byte every half second never trips the socket's timeout: only a whole-reply deadline does
    stop = threading.Event()

    class Trickle(_Recorder):
        def do_GET(self):
            self.send_response(200)
            if where == "body":
                self.end_headers()
            else:  # a header line that never ends: urllib waited in its header parsing
                self.flush_headers()
                self.wfile.write(b"X-Trickle: ")
            with contextlib.suppress(OSError):
                while not stop.wait(0.5):
                    self.wfile.write(b" ")
                    self.wfile.flush()

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            source = watch(url, interval=0.5)
            limit = REPLY_DEADLINE_S + 10  # the deadline, and a loaded machine
            state = wait_for(source, lambda s: s.error is not None, timeout=limit)
            assert f"no whole reply within {REPLY_DEADLINE_S:g} s" in state.error
        finally:
            stop.set()
            server.shutdown()


NODE = "ab" * 28  # Ray's ids: 56 hex digits


def _json_reply(body: object) -> bytes:
    return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + json.dumps(body).encode()


def _state_api(rows: list) -> bytes:
    return _json_reply({"result": True, "data": {"result": {"result": rows}}})


_NODE_ROW = {"node_id": NODE, "state": "ALIVE", "node_ip": "127.0.0.1", "resources_total": {}}
# A one-node cluster's dashboard, each path's whole reply (status line included)
_SANE_DASHBOARD = {
    "/api/version": _json_reply({"ray_version": "2.60.0"}),
    "/api/v0/nodes": _state_api([_NODE_ROW]),
    "/api/v0/actors": _state_api([]),
    f"/nodes/{NODE}": _json_reply({"data": {"detail": {"cpu": 5.0, "mem": [8, 4]}}}),
}


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Writes the server's `replies[path]` as it is, whatever it holds."""

    def do_GET(self):
        self.wfile.write(self.server.replies[self.path.split("?")[0]])

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_dashboard():
    """A one-node cluster's dashboard whose replies a test changes: (server, url)."""
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted) as server:
        server.replies = dict(_SANE_DASHBOARD)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()


_INFINITE_STORE = {"object_store_memory": 1e400}


# json's 1e400 is inf, and int(inf) an OverflowError; deep nesting is a RecursionError, a bad
# status line an HTTPException. Each killed the polling thread (the screen kept the last figures
# for ever), and check_reachable said "no answer in 5 s" after a traceback.
@pytest.mark.parametrize(
    "path, reply",
    [
        ("/api/v0/nodes", b"\x00\xffnot HTTP at all\r\n\r\n"),
        ("/api/v0/nodes", b"HTTP/1.0 200 OK\r\n\r\n" + b"[" * 100_000 + b"]" * 100_000),
        ("/api/v0/nodes", _state_api([{**_NODE_ROW, "resources_total": _INFINITE_STORE}])),
        ("/api/v0/actors", _state_api([{"actor_id": "a", "num_restarts": 1e400}])),
    ],
    ids=["not-http", "nested-too-deep", "infinite-store", "infinite-restarts"],
)  # fmt: skip
def test_a_hostile_reply_is_an_outage_and_polling_goes_on(watch, scripted_dashboard, path, reply):
    server, url = scripted_dashboard
    source = watch(url, interval=0.2)
    wait_for(source, lambda s: s.reachable, timeout=10)
    server.replies[path] = reply
    events: list[str] = []
    state = wait_for(source, lambda s: s.error is not None, timeout=15, events=events)
    assert one_line(state.error).startswith(f"ray cluster at {url} unreachable since ")
    server.replies = dict(_SANE_DASHBOARD)
    wait_for(source, lambda s: s.reachable, timeout=15, events=events)
    assert events == [state.error, f"ray cluster at {url} reachable again"]
    if path == "/api/v0/nodes":  # the check before anything starts says it as fast
        server.replies["/api/version"] = reply
        started = time.monotonic()
        problem = one_line(check_reachable(url))
        assert time.monotonic() - started < 3.0, problem
        assert problem.startswith((f"no Ray dashboard answers at {url}: ", url)), problem
        assert problem.isprintable() and "no answer in" not in problem


def test_a_node_detail_with_an_infinite_rss_leaves_that_nodes_figures_unknown(
    watch, scripted_dashboard
):
    server, url = scripted_dashboard
    source = watch(url, interval=0.2)
    wait_for(source, lambda s: s.nodes and s.nodes[0].cpu_percent == 5.0, timeout=10)
    workers = [{"pid": 1, "memoryInfo": {"rss": 1e400}}]
    server.replies[f"/nodes/{NODE}"] = _json_reply({"data": {"detail": {"workers": workers}}})
    limit = DETAIL_INTERVAL_S + 10  # read again every 5 s; a loaded machine
    wait_for(source, lambda s: s.reachable and s.nodes[0].cpu_percent is None, timeout=limit)
    server.replies = dict(_SANE_DASHBOARD)
    wait_for(source, lambda s: s.nodes[0].cpu_percent == 5.0, timeout=limit)


# --- token authentication (a cluster of its own) ----------------------------------------


def test_token_auth_right_wrong_and_missing_tokens(tmp_path, monkeypatch, watch):
    cluster = start_cluster(token="right-" + os.urandom(8).hex())
    try:
        cluster.start_head()
        url = cluster.url

        wants = one_line(check_reachable(url))
        assert wants == f"the cluster at {url} wants a token: {TOKEN_HINT}"
        wrong = tmp_path / "wrong"
        wrong.write_text("wrong")
        refused = one_line(check_reachable(url, wrong))
        assert refused.startswith(f"the cluster at {url} refused the token from {wrong}: ")
        monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
        assert "refused the token from RAY_AUTH_TOKEN" in check_reachable(url)
        monkeypatch.delenv("RAY_AUTH_TOKEN")

        assert check_reachable(url, cluster.token_file) is None
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_file))
        assert check_reachable(url) is None
        state = wait_for(watch(url), lambda s: s.nodes_alive == 1, timeout=20)
        assert state.error is None

        # A source without the token says so once, as its error and as one event.
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
        source = watch(url, interval=0.3)
        events: list[str] = []
        state = wait_for(source, lambda s: s.error is not None, timeout=10, events=events)
        assert not state.reachable and state.error == wants
        time.sleep(1.0)
        assert events + source.events() == [wants]

        cluster.stop()  # refused, then gone: the error says the new reason, once
        state = wait_for(source, lambda s: s.error != wants, timeout=30, events=events)
        assert state.error.startswith(f"ray cluster at {url} unreachable since ")
        assert events == [wants, state.error]
    finally:
        cluster.stop()


# --- one real two-node cluster -----------------------------------------------------------


def test_auto_finds_the_local_cluster_as_ray_does(ray_cluster, monkeypatch):
    # RAY_TMPDIR moves Ray's default temp dir (and its ray_current_cluster) under the base.
    monkeypatch.setenv("RAY_TMPDIR", str(ray_cluster.cluster.base))
    assert resolve_address("auto") == ray_cluster.cluster.url
    assert check_reachable("auto") is None


def test_both_nodes_and_the_jobs_actors_with_real_figures(ray_cluster, watch):
    source = watch(ray_cluster.cluster.url)
    assert source.wait_polled(timeout=10)
    state = wait_for(source, three_actors_listed, timeout=40)
    assert state.reachable and state.error is None and state.polled_at <= time.time()
    machine = psutil.virtual_memory().total
    for node in state.nodes:
        assert node.alive and node.cpus == 1.0 and node.gpus == 0.0
        assert node.object_store_total == 100_000_000  # --object-store-memory
        assert node.memory_total == machine  # both raylets run on this machine
        assert 0 < node.memory_used < machine
        assert 0.0 <= node.cpu_percent <= 100.0
        assert node.object_store_used is not None
    assert [node.is_head for node in state.nodes] == [True, False]
    # Two nodes on one host: the host's memory counts once.
    assert state.memory_total == machine
    assert state.cpu_percent is not None

    assert {(a.class_name, a.name) for a in state.actors} == {
        ("Pinned", "left"), ("Pinned", "right"), ("Phoenix", "phoenix")
    }  # fmt: skip
    node_ids = {node.node_id for node in state.nodes}
    for a in state.actors:
        process = psutil.Process(a.pid)  # a real process on this machine...
        assert process.name().startswith("ray::")  # ...that Ray titles after the actor
        assert a.node_id in node_ids and a.num_restarts == 0 and a.death_cause is None
        assert process.memory_info().rss / 2 < a.rss < process.memory_info().rss * 2
        assert a.cpu_percent >= 0.0
    assert actor(state, "left").node_id != actor(state, "right").node_id
    assert state.restarts == 0


def test_the_node_detail_adapter_reads_the_installed_rays_process_stats(ray_cluster, watch):
    # /nodes/{id} is a dashboard endpoint, not a documented API: if Ray changes its shape, this
    # fails first. The driver runs on the head node, so its process is listed there.
    url, driver = ray_cluster.cluster.url, ray_cluster.driver
    state = wait_for(watch(url), lambda s: s.nodes, timeout=10)
    head_id = next(node.node_id for node in state.nodes if node.is_head)
    deadline = time.monotonic() + 30
    while driver.pid not in (detail := NodeDetail.fetch(url, head_id, None)).processes:
        assert time.monotonic() < deadline, sorted(detail.processes)
        time.sleep(0.5)
    rss = psutil.Process(driver.pid).memory_info().rss
    assert rss / 2 < detail.processes[driver.pid].rss < rss * 2
    assert detail.memory_total == psutil.virtual_memory().total
    assert 0 < detail.memory_used < detail.memory_total
    assert 0.0 <= detail.cpu_percent <= 100.0
    assert detail.object_store_used is not None


def test_sigkill_of_a_restartable_actor_is_a_restart_event(ray_cluster, watch):
    source = watch(ray_cluster.cluster.url, interval=0.5)
    before = actor(wait_for(source, lambda s: s.actors_alive == 3, timeout=20), "phoenix")
    os.kill(before.pid, signal.SIGKILL)
    events: list[str] = []

    def restarted(state: ClusterState) -> bool:
        phoenix = actor(state, "phoenix")
        return phoenix.state == "ALIVE" and phoenix.pid != before.pid

    state = wait_for(source, restarted, timeout=30, events=events)
    assert actor(state, "phoenix").num_restarts == 1 and state.restarts == 1
    assert "ray actor Phoenix phoenix restarted (restarts: 1)" in events
    assert not any("died" in event for event in events), events


def test_a_stopped_raylet_is_a_dead_node_and_its_actor_dies(ray_cluster, watch):
    source = watch(ray_cluster.cluster.url, interval=0.5)
    state = wait_for(source, lambda s: s.nodes_alive == 2 and s.actors_alive == 3, timeout=20)
    second = next(node for node in state.nodes if not node.is_head)
    stranded = next(a for a in state.actors if a.node_id == second.node_id and a.name != "phoenix")
    started = time.monotonic()
    LocalRayCluster.stop_group(ray_cluster.node)
    events: list[str] = []

    def node_dead(state: ClusterState) -> bool:
        return not next(n for n in state.nodes if n.node_id == second.node_id).alive

    state = wait_for(source, node_dead, timeout=30, events=events)
    assert time.monotonic() - started < 30
    dead = next(n for n in state.nodes if n.node_id == second.node_id)
    assert dead.memory_used is None and dead.cpu_percent is None  # no stale figures
    assert state.nodes_alive == 1 and len(state.nodes) == 2
    assert any(e.startswith(f"ray node {second.node_id[:8]} ({second.ip}) died") for e in events)

    state = wait_for(source, lambda s: actor(s, stranded.name).state == "DEAD", 30, events)
    cause = one_line(actor(state, stranded.name).death_cause)
    assert f"ray actor Pinned {stranded.name} died: {cause}" in events


def test_a_stopped_cluster_is_unreachable_then_recovers_on_the_same_address(ray_cluster, watch):
    cluster = ray_cluster.cluster
    source = watch(cluster.url, interval=0.5)
    old = wait_for(source, lambda s: s.nodes_alive >= 1, timeout=20)
    source.events()
    for group in (ray_cluster.driver, ray_cluster.head):
        LocalRayCluster.stop_group(group)

    events: list[str] = []
    unreachable = wait_for(source, lambda s: not s.reachable, timeout=15, events=events)
    assert unreachable.nodes == () and unreachable.actors == ()  # nothing stale is shown
    assert re.fullmatch(rf"ray cluster at {cluster.url} unreachable since \d\d:\d\d:\d\d \(.+\)",
                        one_line(unreachable.error))  # fmt: skip
    started = time.monotonic()
    source.sample()
    assert time.monotonic() - started < 0.05

    cluster.start_head()  # a new cluster on the same ports
    state = wait_for(source, lambda s: s.nodes_alive == 1, timeout=60, events=events)
    assert state.reachable and state.error is None and state.unreachable_since is None
    assert state.nodes[0].node_id not in {node.node_id for node in old.nodes}
    assert [e for e in events if "unreachable" in e] == [unreachable.error], events
    assert events[-1] == f"ray cluster at {cluster.url} reachable again", events
