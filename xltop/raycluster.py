"""A Ray cluster as a source, read over the dashboard's HTTP interfaces.

xltop never becomes a Ray driver (`ray.init` would take over SIGTERM) and never imports `ray`:
the State API's REST endpoints give nodes and actors, and the one figure only a dashboard
endpoint has (per-process RSS and CPU, for actors) is read by `NodeDetail`, the adapter kept
apart because that endpoint is not a documented API.

`RayCluster.sample()` never blocks and never raises: a worker thread polls the cheap lists every
`interval` and the per-node detail every `DETAIL_INTERVAL_S`, each request bounded by a
timeout, and `sample()` returns its newest `ClusterState` (the Snapshot's, xltop.snapshot).
Deaths, restarts and reachability changes are strings that `events()` hands out once each.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttt_runtime.files import NotARegularFile, read_bounded
from xltop.snapshot import ClusterActor, ClusterNode, ClusterState

DEFAULT_DASHBOARD_PORT = 8265
REQUEST_TIMEOUT_S = 2.0
CHECK_TIMEOUT_S = 5.0
# Ray's agents refresh per-node and per-process figures about every 5 s: polling faster reads
# the same numbers again.
DETAIL_INTERVAL_S = 5.0
MAX_ROWS = 10_000  # the State API's own ceiling (RAY_MAX_LIMIT_FROM_API_SERVER)
TOKEN_HINT = "set RAY_AUTH_TOKEN_PATH or pass --ray-token-file FILE"
# The dashboard's own log names the address it serves, once, at start-up.
DASHBOARD_LOG_LINE = re.compile(rb"Dashboard head http address: (\S+)")
HOSTNAME = re.compile(r"[A-Za-z0-9._:%-]+\Z")  # names, IPv4, IPv6 (with a zone)
DASHBOARD_LOG_HEAD_BYTES = 64 * 1024
TOKEN_MAX_BYTES = 64 * 1024  # Ray's tokens are tens of bytes
MAX_REPLY_BYTES = 128 << 20  # MAX_ROWS actors in detail are a few tens of MiB
# A whole reply's time: the socket's timeout bounds each read only, and a reply trickling in a
# byte at a time would hold the poll (and the last figures on screen) for ever.
REPLY_DEADLINE_S = 10.0


# The dashboard lives on the cluster's network: an http_proxy meant for the internet must not
# carry requests for 127.0.0.1 or a cluster-internal host.
class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A dashboard's API never redirects; urllib would follow one to any host, the token's
    Authorization header included. A redirect is an HTTPError instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _DeadlineConnection(http.client.HTTPConnection):
    """A connection whose status line and headers must all arrive by REPLY_DEADLINE_S after it
    connects, or its socket is shut: the socket's timeout bounds each read only, and headers
    trickling in a byte at a time held urllib's parsing (and the poll) for ever. The body has
    its own deadline (`_read_reply`)."""

    def connect(self) -> None:
        super().connect()
        self._cut = threading.Event()
        self._timer = threading.Timer(REPLY_DEADLINE_S, self._shut)
        self._timer.daemon = True
        self._timer.start()

    def _shut(self) -> None:
        self._cut.set()
        with contextlib.suppress(OSError, AttributeError):  # closed meanwhile: sock is None
            self.sock.shutdown(socket.SHUT_RDWR)

    def getresponse(self) -> http.client.HTTPResponse:
        late = TimeoutError(f"no whole reply within {REPLY_DEADLINE_S:g} s")
        try:
            response = super().getresponse()
        except (OSError, http.client.HTTPException):
            if self._cut.is_set():
                raise late from None
            raise
        finally:
            self._timer.cancel()
        if self._cut.is_set():  # the cut can also end the headers early, as a blank line does
            response.close()
            raise late
        return response


class _DeadlineHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineConnection, req)


_OPENER = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), _NoRedirects(), _DeadlineHandler()
)


class RayClusterError(Exception):
    """Bad input (an address that is not one, a token file that cannot be read): one line."""


# --- address and token -------------------------------------------------------------------


def dashboard_url(address: str) -> str:
    """`http://HOST:PORT` from a dashboard address given with or without its scheme and port
    (Ray's default dashboard port, 8265)."""
    text = address.strip()
    try:
        parsed = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
        port = DEFAULT_DASHBOARD_PORT if parsed.port is None else parsed.port
    except ValueError:  # an unclosed IPv6 bracket; a port out of range or not a number
        parsed, port = urllib.parse.urlsplit(""), 0
    hostname = parsed.hostname or ""
    if parsed.scheme not in ("http", "https") or not HOSTNAME.match(hostname) or not port:
        raise RayClusterError(
            f"not a Ray dashboard address: {address!r} (want http://HOST:PORT or auto)"
        )
    host = f"[{hostname}]" if ":" in hostname else hostname  # IPv6 goes back in brackets
    return f"{parsed.scheme}://{host}:{port}"


def ray_temp_dir() -> Path:
    """Where `ray start` keeps ray_current_cluster and the sessions, found as Ray finds it."""
    system = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(system) / "ray"


def _dashboard_from_session(temp_dir: Path) -> str | None:
    """The address the newest session's dashboard logged when it started."""
    try:
        with open(temp_dir / "session_latest" / "logs" / "dashboard.log", "rb") as log:
            match = DASHBOARD_LOG_LINE.search(log.read(DASHBOARD_LOG_HEAD_BYTES))
    except OSError:
        return None
    return match.group(1).decode(errors="replace") if match else None


def find_local_dashboard() -> str | None:
    """The dashboard of the cluster `ray.init()` would attach to, or None if there is none.

    Ray's own order: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then the cluster the last
    `ray start` on this machine recorded in <temp dir>/ray_current_cluster (its GCS address).
    Ray asks the GCS for the dashboard's address over gRPC; without `ray`, the newest session's
    dashboard log says it, and the default port on the GCS host is the fallback.
    """
    for variable in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(variable, "").strip()
        if value.startswith(("http://", "https://")):
            return value
    gcs = os.environ.get("RAY_ADDRESS", "").strip()
    temp_dir = ray_temp_dir()
    try:
        recorded = (temp_dir / "ray_current_cluster").read_text().strip()
    except OSError:
        recorded = ""
    if gcs in ("", "auto"):
        gcs = recorded
    if not gcs:
        return None
    if gcs == recorded and (logged := _dashboard_from_session(temp_dir)):
        host, _, port = logged.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]"):  # listening everywhere: this machine will do
            host = "127.0.0.1"
        return f"http://{host}:{port}"
    return f"http://{gcs.rpartition(':')[0]}:{DEFAULT_DASHBOARD_PORT}"


def resolve_address(address: str) -> str:
    """The dashboard URL for `--ray ADDRESS` ("auto" included). RayClusterError if malformed,
    or if "auto" finds no local cluster."""
    if address.strip() != "auto":
        return dashboard_url(address)
    found = find_local_dashboard()
    if found is None:
        raise RayClusterError(
            f"no local Ray cluster found (no RAY_ADDRESS, nothing in "
            f"{ray_temp_dir() / 'ray_current_cluster'}): give its dashboard address, "
            f"e.g. http://HOST:{DEFAULT_DASHBOARD_PORT}"
        )
    return dashboard_url(found)


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages (never the token itself)


def find_token(token_file: str | os.PathLike | None = None) -> Token | None:
    """The cluster token: `token_file` if given, else where Ray keeps it (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), else None. RayClusterError if a named file
    cannot be read or is empty."""
    if token_file is not None:
        return _read_token(Path(token_file), str(token_file))
    if value := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(value, "RAY_AUTH_TOKEN")
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(Path(path).expanduser(), f"RAY_AUTH_TOKEN_PATH ({path})")
    default = Path.home() / ".ray" / "auth_token"
    return _read_token(default, str(default)) if default.is_file() else None


def _read_token(path: Path, source: str) -> Token:
    def unreadable(reason: str) -> RayClusterError:
        return RayClusterError(f"cannot read the Ray token file {source}: {reason}")

    try:
        data = read_bounded(path, TOKEN_MAX_BYTES)  # a FIFO or /dev/zero: refused, no end
    except NotARegularFile:
        raise unreadable("not a regular file") from None
    except OSError as exc:
        raise unreadable(_reason(exc)) from None
    if len(data) > TOKEN_MAX_BYTES:
        raise unreadable(f"over {TOKEN_MAX_BYTES} bytes, not a token")
    try:
        value = data.decode().strip()
    except UnicodeDecodeError as exc:
        raise unreadable(_reason(exc)) from None
    if not value:
        raise RayClusterError(f"the Ray token file {source} is empty")
    return Token(value, source)


# --- HTTP --------------------------------------------------------------------------------


class _Refused(Exception):
    """The dashboard answered 401/403; the message says what to do."""


class _NoAnswer(Exception):
    """Nothing usable came back: connection refused, timeout, an HTTP error, not JSON."""


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
    return str(reason) or type(exc).__name__


def _read_reply(response: Any, deadline: float) -> bytes:
    """The reply's body, at most MAX_REPLY_BYTES of it and by `deadline` (monotonic)."""
    body = bytearray()
    while chunk := response.read1(1 << 20):  # what has come, at most a MiB
        body += chunk
        if len(body) > MAX_REPLY_BYTES:  # a reply that never ends, too
            raise _NoAnswer(f"a reply over {MAX_REPLY_BYTES} bytes")
        if time.monotonic() > deadline:
            raise _NoAnswer(f"no whole reply within {REPLY_DEADLINE_S:g} s")
    return bytes(body)


def _get_json(url: str, path: str, token: Token | None, timeout: float) -> Any:
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token.value}"
    request = urllib.request.Request(url + path, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return json.loads(_read_reply(response, time.monotonic() + REPLY_DEADLINE_S))
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 401:
            raise _Refused(f"the cluster at {url} wants a token: {TOKEN_HINT}") from None
        if exc.code == 403:
            source = token.source if token else "nowhere"
            raise _Refused(
                f"the cluster at {url} refused the token from {source}: {TOKEN_HINT} "
                f"naming the cluster's token"
            ) from None
        if 300 <= exc.code < 400:
            raise _NoAnswer(f"HTTP {exc.code} redirects to {exc.headers.get('Location')}") from None
        raise _NoAnswer(f"HTTP {exc.code} {exc.reason}") from None
    except (OSError, ValueError, RecursionError) as exc:  # URLError and timeouts are OSErrors;
        raise _NoAnswer(_reason(exc)) from None  # bad JSON, or JSON nested too deep
    except http.client.HTTPException as exc:  # not HTTP: its text is whatever the server sent
        raise _NoAnswer(f"a broken HTTP reply ({type(exc).__name__})") from None


def _state_api_rows(url: str, resource: str, token: Token | None) -> list[dict[str, Any]]:
    reply = _get_json(
        url, f"/api/v0/{resource}?detail=1&limit={MAX_ROWS}", token, REQUEST_TIMEOUT_S
    )
    if isinstance(reply, dict) and reply.get("result") is False:  # Ray's own error reply
        raise _NoAnswer(f"/api/v0/{resource}: {reply.get('msg') or 'failed'}")
    try:
        return list(reply["data"]["result"]["result"])
    except (KeyError, TypeError):
        raise _NoAnswer(f"/api/v0/{resource} is not a Ray State API answer") from None


def check_reachable(
    address: str, token_file: str | os.PathLike | None = None, timeout: float = CHECK_TIMEOUT_S
) -> str | None:
    """None if a Ray dashboard answers at `address` with the token found; else one line
    saying why not, within `timeout` (name lookups included). RayClusterError for a malformed
    address or an unreadable token file (usage errors, before anything is asked)."""
    url = resolve_address(address)
    token = find_token(token_file)
    answer: list[str | None] = []
    # A daemon thread: a name lookup ignores the socket timeout, and must not hold the exit.
    asking = threading.Thread(
        target=lambda: answer.append(_dashboard_problem(url, token, timeout)), daemon=True
    )
    asking.start()
    asking.join(timeout)
    return answer[0] if answer else f"no Ray dashboard answers at {url}: no answer in {timeout:g} s"


def _dashboard_problem(url: str, token: Token | None, timeout: float) -> str | None:
    try:
        reply = _get_json(url, "/api/version", token, timeout)
    except _Refused as exc:
        return str(exc)
    except _NoAnswer as exc:
        return f"no Ray dashboard answers at {url}: {exc}"
    if not isinstance(reply, dict) or "ray_version" not in reply:
        return f"{url} answers, but not as a Ray dashboard"
    return None


# --- the dashboard adapter ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcessStats:
    rss: int  # bytes
    cpu_percent: float  # of one core


@dataclass(frozen=True)
class NodeDetail:
    """What the dashboard's `/nodes/{node_id}` says about a node (Ray 2.x; not a documented API,
    so everything it is read for lives here): host figures and its worker processes."""

    cpu_percent: float | None
    memory_used: int | None
    memory_total: int | None
    object_store_used: int | None
    processes: dict[int, ProcessStats]  # by pid: actors' workers, drivers, Ray's agents

    @classmethod
    def from_reply(cls, reply: Any) -> NodeDetail:
        detail = reply["data"]["detail"]
        # psutil.virtual_memory(): total, available, percent, used
        mem: list[float] = detail.get("mem") or []
        raylet = detail.get("raylet") or {}
        processes = {}
        for worker in detail.get("workers") or ():
            rss = (worker.get("memoryInfo") or {}).get("rss")
            if isinstance(worker.get("pid"), int) and rss is not None:
                processes[worker["pid"]] = ProcessStats(
                    rss=int(rss), cpu_percent=float(worker.get("cpuPercent") or 0.0)
                )
        return cls(
            cpu_percent=_float_or_none(detail.get("cpu")),
            memory_used=int(mem[0] - mem[1]) if len(mem) >= 2 else None,
            memory_total=int(mem[0]) if mem else None,
            object_store_used=_int_or_none(raylet.get("objectStoreUsedMemory")),
            processes=processes,
        )

    @classmethod
    def fetch(cls, url: str, node_id: str, token: Token | None) -> NodeDetail:
        reply = _get_json(url, f"/nodes/{node_id}", token, REQUEST_TIMEOUT_S)
        try:
            return cls.from_reply(reply)
        except (KeyError, TypeError, ValueError, OverflowError):  # JSON's 1e400 is inf: int(inf)
            raise _NoAnswer(f"/nodes/{node_id} has an unknown shape") from None


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


# --- State API rows as dataclasses -------------------------------------------------------


def _node(row: dict[str, Any], details: dict[str, NodeDetail]) -> ClusterNode:
    node_id = str(row.get("node_id") or "")
    resources = row.get("resources_total") or {}
    alive = row.get("state") == "ALIVE"
    live = details.get(node_id) if alive else None
    return ClusterNode(
        node_id=node_id,
        ip=str(row.get("node_ip") or ""),
        is_head=bool(row.get("is_head_node")),
        alive=alive,
        state_message=row.get("state_message"),
        cpus=float(resources.get("CPU") or 0.0),
        gpus=float(resources.get("GPU") or 0.0),
        object_store_total=int(resources.get("object_store_memory") or 0),
        cpu_percent=live.cpu_percent if live else None,
        memory_used=live.memory_used if live else None,
        memory_total=live.memory_total if live else None,
        object_store_used=live.object_store_used if live else None,
    )


def death_cause_line(cause: Any) -> str | None:
    """Ray's death_cause (one context object, e.g. actor_died_error_context) in one line."""
    if not isinstance(cause, dict) or not cause:
        return None
    context = next(iter(cause.values()))
    if not isinstance(context, dict):
        return str(context)
    message = str(context.get("error_message") or "").strip()
    first_sentence = message.split(". ")[0].rstrip(".").replace("\n", " ")
    reason = context.get("reason")
    return ": ".join(str(part) for part in (reason, first_sentence) if part) or None


def _actor(row: dict[str, Any], details: dict[str, NodeDetail]) -> ClusterActor:
    pid: int | None = row.get("pid") or None  # 0 before the worker exists
    node_id = row.get("node_id")
    state = str(row.get("state") or "")
    live = details.get(node_id) if node_id and state == "ALIVE" else None
    stats = live.processes.get(pid) if live and pid is not None else None
    return ClusterActor(
        actor_id=str(row.get("actor_id") or ""),
        class_name=str(row.get("class_name") or ""),
        name=str(row.get("name") or ""),
        state=state,
        pid=pid,
        node_id=node_id,
        num_restarts=int(row.get("num_restarts") or 0),  # a string in the REST answer
        death_cause=death_cause_line(row.get("death_cause")),
        rss=stats.rss if stats else None,
        cpu_percent=stats.cpu_percent if stats else None,
    )


def _clock(unix_seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix_seconds))


# --- the source --------------------------------------------------------------------------


class RayCluster:
    """A Ray cluster watched through its dashboard at `address` ("auto": the local cluster).

    RayClusterError at construction for a malformed address or an unreadable token file; after
    that nothing raises: an unreachable or refusing cluster is a ClusterState saying so, and
    polling goes on, so the source recovers when a cluster answers at that address again.
    """

    def __init__(
        self, address: str, token_file: str | os.PathLike | None = None, interval: float = 1.0
    ):
        self.url = resolve_address(address)
        self._token = find_token(token_file)
        self.interval = interval  # seconds between polls of the lists; may change any time
        self._state = ClusterState(address=self.url, reachable=False)
        self._details: dict[str, NodeDetail] = {}
        self._next_detail_poll = 0.0  # monotonic
        self._alive_nodes: dict[str, bool] = {}  # by node id, as last seen
        self._actor_seen: dict[str, ClusterActor] = {}  # by actor id, as last seen
        self._outage: str | None = None  # the "unreachable since" line of the current outage
        self._events: list[str] = []
        self._lock = threading.Lock()
        self._polled = threading.Event()  # set once a whole poll (lists and details) is in
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xltop-ray-poll", daemon=True)
        self._thread.start()

    def sample(self) -> ClusterState:
        """The newest state; returns at once."""
        with self._lock:
            return self._state

    def events(self) -> list[str]:
        """What happened since the last call (deaths, restarts, reachability), oldest first."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def wait_polled(self, timeout: float) -> bool:
        """Wait until one whole poll has answered (for a one-shot `--json`); False on time-out."""
        return self._polled.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S * 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._poll(started)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _poll(self, now: float) -> None:
        try:
            node_rows = _state_api_rows(self.url, "nodes", self._token)
            actor_rows = _state_api_rows(self.url, "actors", self._token)
        except _Refused as exc:
            self._fail(str(exc))
            return
        except _NoAnswer as exc:
            self._fail(None, str(exc))
            return
        read_details = now >= self._next_detail_poll
        if read_details:
            self._next_detail_poll = now + max(DETAIL_INTERVAL_S, self.interval)
            self._details = self._read_details(node_rows)
        try:
            nodes = [_node(row, self._details) for row in node_rows]
            actors = [_actor(row, self._details) for row in actor_rows]
        # a Ray that answers otherwise; JSON's 1e400 is inf, and int(inf) an OverflowError
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            self._fail(None, f"an answer xltop cannot read: {exc}")
            return
        nodes.sort(key=lambda node: (not node.is_head, node.ip, node.node_id))
        actors.sort(key=lambda actor: (actor.class_name, actor.name, actor.actor_id))
        state = ClusterState(
            address=self.url,
            reachable=True,
            nodes=tuple(nodes),
            actors=tuple(actors),
            polled_at=time.time(),
        )
        self._outage = None
        self._publish(state, self._changes(state.nodes, state.actors))
        if read_details:
            self._polled.set()

    def _read_details(self, node_rows: list[dict[str, Any]]) -> dict[str, NodeDetail]:
        details = {}
        for row in node_rows:
            node_id = row.get("node_id")
            if row.get("state") != "ALIVE" or not node_id:
                continue
            # A node that does not answer keeps unknown figures until the next detail poll.
            with contextlib.suppress(_NoAnswer, _Refused):
                details[node_id] = NodeDetail.fetch(self.url, node_id, self._token)
        return details

    def _changes(
        self, nodes: tuple[ClusterNode, ...], actors: tuple[ClusterActor, ...]
    ) -> list[str]:
        """Events for what changed on nodes and actors seen before (a cluster first seen, or a
        new one on the same address, has ids never seen: nothing to report)."""
        events = []
        for node in nodes:
            if self._alive_nodes.get(node.node_id) and not node.alive:
                why = f": {node.state_message}" if node.state_message else ""
                events.append(f"ray node {node.node_id[:8]} ({node.ip}) died{why}")
        for actor in actors:
            before = self._actor_seen.get(actor.actor_id)
            if before is None:
                continue
            if actor.num_restarts > before.num_restarts:
                events.append(f"ray actor {actor.label} restarted (restarts: {actor.num_restarts})")
            if actor.state == "DEAD" and before.state != "DEAD":
                why = f": {actor.death_cause}" if actor.death_cause else ""
                events.append(f"ray actor {actor.label} died{why}")
        self._alive_nodes = {node.node_id: node.alive for node in nodes}
        self._actor_seen = {actor.actor_id: actor for actor in actors}
        return events

    def _fail(self, refusal: str | None, reason: str | None = None) -> None:
        """Publish an unreachable state: `refusal` (a 401/403's line) or "unreachable since"
        with the first failure's reason, kept for the whole outage so it is said once."""
        previous = self.sample()
        since = previous.unreachable_since or time.time()
        if refusal is not None:
            error = refusal
        else:
            if self._outage is None:
                self._outage = (
                    f"ray cluster at {self.url} unreachable since {_clock(since)} ({reason})"
                )
            error = self._outage
        state = ClusterState(
            address=self.url,
            reachable=False,
            unreachable_since=since,
            error=error,
            polled_at=previous.polled_at,
        )
        self._details = {}
        self._next_detail_poll = 0.0  # read them at once when the cluster is back
        self._publish(state, [error] if error != previous.error else [])

    def _publish(self, state: ClusterState, events: list[str]) -> None:
        with self._lock:
            previous, self._state = self._state, state
            if state.reachable and previous.unreachable_since is not None:
                events.insert(0, f"ray cluster at {self.url} reachable again")
            self._events.extend(events)
