"""The channel over real Unix sockets: server and clients in this process, on threads."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from typing import Any

import pytest
from messages import HELLO, telemetry
from polling import wait_until
from test_run import connect, report, run_cli

from ttt_runtime.channel import (
    LINES_PER_LOOK,
    MAX_LINE,
    ChannelClient,
    ChannelError,
    ChannelServer,
)
from ttt_runtime.protocol import ErrorReport, Reply, decode, encode


@pytest.fixture
def server(tmp_path):
    srv = ChannelServer(str(tmp_path / "run.sock"), HELLO)
    yield srv
    srv.close()


@pytest.fixture
def clients():
    opened = []

    def connect(path, timeout=5.0):
        client = ChannelClient.connect(path, timeout=timeout)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


class RawPeer:
    """A plain socket to a channel, as a hostile or careless client would use it."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buffer = b""

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *_) -> None:
        self.sock.close()

    def send(self, *lines: bytes) -> None:
        self.sock.sendall(b"".join(line + b"\n" for line in lines))

    def messages(self, replies: int) -> list[dict]:
        """Every message up to and including the `replies`-th reply (fewer if the run closes)."""
        messages: list[dict] = []
        deadline = time.monotonic() + self.timeout  # telemetry keeps coming: recv never times out
        while replies > 0:
            assert time.monotonic() < deadline, f"{replies} replies missing after {self.timeout} s"
            while b"\n" not in self._buffer:
                data = self.sock.recv(65536)
                if not data:
                    return messages
                self._buffer += data
            line, self._buffer = self._buffer.split(b"\n", 1)
            messages.append(decode(line))
            replies -= messages[-1].get("type") == "reply"
        return messages

    def replies(self, count: int) -> list[dict]:
        return [m for m in self.messages(count) if m.get("type") == "reply"]


def raw_exchange(path: str, payload: bytes) -> list[dict]:
    """Send raw bytes on a plain socket; return the messages up to the first reply."""
    with RawPeer(path) as peer:
        peer.sock.sendall(payload)
        return peer.messages(1)


def take(server, wait=0.05):
    """Play one look of the run loop for one command: (peer, command), or None."""
    return next(server.commands(wait), None)


def answer_one(server, **extra):
    """Play the run loop once: take the next command and reply to it."""
    peer, command = wait_until(lambda: take(server))
    server.reply(peer, command, **extra)
    return command


def test_hello_and_telemetry_reach_every_client(server, clients):
    first, second = clients(server.path), clients(server.path)
    assert first.hello == second.hello == HELLO
    assert first.latest() is None
    wait_until(lambda: server.monitors == 2)
    for step in (1, 2, 3):
        server.publish(telemetry(step))
    for client in (first, second):
        wait_until(lambda c=client: c.latest() == telemetry(3))


def test_request_gets_its_reply(server, clients):
    client = clients(server.path)
    replies = []
    thread = threading.Thread(target=lambda: replies.append(client.request("pause", timeout=10)))
    thread.start()
    command = answer_one(server, note="paused")
    thread.join(10)
    assert command["cmd"] == "pause"
    assert replies == [Reply(command["id"], "pause", ok=True, extras={"note": "paused"})]


def test_hello_command_is_answered_by_the_channel(server, clients):
    reply = clients(server.path).request("hello", timeout=10)
    assert reply.ok and reply.extras == dataclasses.asdict(HELLO)
    assert take(server, 0.1) is None  # never reaches the run loop


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"this is not json\n", "not JSON"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b'{"cmd": "rm -rf /", "id": 7}\n', "unknown command"),
        (b'{"cmd": "save", "path": 3, "id": 8}\n', "'path' must be a string"),
        (b'{"id": 9}\n', "unknown command"),
    ],
)
def test_malformed_commands_get_an_error_and_change_nothing(server, clients, payload, expected):
    messages = raw_exchange(server.path, payload)
    assert messages[0]["type"] == "hello"
    reply = messages[-1]
    assert reply["type"] == "reply" and reply["ok"] is False and expected in reply["error"]
    assert take(server, 0.1) is None
    # the server still serves
    client = clients(server.path)
    assert client.request("hello", timeout=10).ok


def test_an_overlong_line_is_refused(server):
    messages = raw_exchange(server.path, b"x" * (70 * 1024))
    assert messages[-1]["ok"] is False and "longer than" in messages[-1]["error"]


def test_socket_is_private_and_a_wide_socket_is_refused(server, tmp_path):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    os.chmod(server.path, 0o666)
    with pytest.raises(ChannelError, match="mode 0o666 lets other users in"):
        ChannelClient.connect(server.path, timeout=2)


# a system interpreter another user can execute (ours may live under root's home)
OTHER_USER_PYTHON = next((p for p in ("/usr/bin/python3",) if os.access(p, os.X_OK)), None)


@pytest.mark.skipif(os.getuid() != 0 or OTHER_USER_PYTHON is None, reason="needs root")
def test_another_user_is_refused():
    """A second uid cannot open the 0600 socket; with the mode widened on purpose, the
    server's peer-credential check still closes the connection before any hello."""
    folder = tempfile.mkdtemp()
    os.chmod(folder, 0o755)  # reachable by others, so only the socket's own mode protects it
    srv = ChannelServer(os.path.join(folder, "run.sock"), HELLO)
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    print('denied'); sys.exit()\n"
        "s.settimeout(10)\n"
        "print('got', s.recv(100))\n"
    )

    def as_nobody():
        return subprocess.run(
            [OTHER_USER_PYTHON, "-c", probe, srv.path],
            user=65534,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()

    try:
        assert as_nobody() == "denied"
        os.chmod(srv.path, 0o666)
        assert as_nobody() == "got b''"  # closed without a byte
    finally:
        srv.close()
        shutil.rmtree(folder)


def test_stale_socket_of_a_dead_run_is_replaced(tmp_path, clients):
    path = str(tmp_path / "run.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    os.chmod(path, 0o600)
    dead.close()  # the file stays, nobody listens: what a killed run leaves
    with pytest.raises(ChannelError, match="no run is listening"):
        ChannelClient.connect(path, timeout=2)
    srv = ChannelServer(path, HELLO)
    try:
        assert clients(path).hello == HELLO
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_live_socket_or_other_file_is_not_replaced(server, tmp_path):
    with pytest.raises(ChannelError, match="already listening"):
        ChannelServer(server.path, HELLO)
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(ChannelError, match="not a socket"):
        ChannelServer(str(other), HELLO)
    assert other.read_text() == "keep me"


def test_a_run_leaving_removes_only_its_own_socket_never_a_newer_runs(server, clients):
    # its socket deleted (by hand, or a cleanup), a second run may listen at the same path
    os.unlink(server.path)
    newer = ChannelServer(server.path, dataclasses.replace(HELLO, pid=HELLO.pid + 1))
    try:
        server.close()  # the first run exits
        assert clients(server.path).hello.pid == HELLO.pid + 1  # the newer one is still there
    finally:
        newer.close()
    assert not os.path.exists(server.path)  # which removed its own


def test_missing_socket_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(ChannelError, match="no such socket"):
        ChannelClient.connect(str(tmp_path / "nothing.sock"), timeout=5)
    assert time.monotonic() - start < 1.0


def test_closing_is_seen_at_once_and_requests_fail_cleanly(tmp_path, clients):
    srv = ChannelServer(str(tmp_path / "run.sock"), HELLO)
    client = clients(srv.path)
    srv.publish(ErrorReport(exc_type="RuntimeError", message="boom", traceback=""))
    srv.close()
    wait_until(lambda: not client.alive, timeout=2)
    assert client.last_error.message == "boom"
    with pytest.raises(ChannelError, match="closed its channel"):
        client.request("pause", timeout=2)


def test_a_request_without_reply_times_out(server, clients):
    client = clients(server.path)
    start = time.monotonic()
    with pytest.raises(ChannelError, match="no reply"):
        client.request("pause", timeout=0.3)
    assert time.monotonic() - start < 3


def test_a_monitor_once_greeted_receives_everything_published_after(server, clients):
    # The greeting must not go out before the server counts the monitor among its peers: a
    # message published in between would be lost to it (seen once as a missing error report).
    for i in range(100):
        client = clients(server.path)
        server.publish(ErrorReport(exc_type="E", message=str(i), traceback=""))
        wait_until(lambda c=client: c.last_error is not None, timeout=2)
        assert client.last_error.message == str(i)
        client.close()


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"[" * 5000 + b"]" * 5000, "not JSON: nested too deeply"),
        (b'{"cmd": "pause", "id": ' + b"9" * 5000 + b"}", "not JSON: an integer of 5000 digits"),
        (b'{"cmd": "pause", "id": {"a": 1}}', "'id' must be"),
        (b'{"cmd": "pause", "id": [1]}', "'id' must be"),
        (b'{"cmd": "pause", "id": true}', "'id' must be"),
        (b'{"cmd": "pause", "id": 1.5}', "'id' must be"),
        (b'{"cmd": "pause", "id": 1e999}', "'id' must be"),
        (b'{"cmd": "pause", "id": ' + b"9" * 30 + b"}", "'id' must be"),
        (b'{"cmd": "pause", "id": "' + b"x" * 101 + b'"}', "'id' must be"),
        (b'{"cmd": "pause\xff"}', "not JSON"),
        (b'{"cmd": "pause\x00"}', "not JSON"),
        (b'{"cmd": ' + b"[" * 500 + b"]" * 500 + b"}", "unknown command [[[[[[[...]]]]]]]"),
        (b'{"cmd": "' + b"x" * 5000 + b'"}', "unknown command 'xxxxxxxxxxxx"),
    ],
    ids=[
        "deep",
        "5000 digits",
        "object id",
        "list id",
        "bool id",
        "fraction id",
        "inf id",
        "30 digits id",
        "101 chars id",
        "bad utf-8",
        "nul",
        "nested cmd",
        "long cmd",
    ],
)
def test_every_malformed_line_gets_a_short_error_and_the_connection_keeps_working(
    server, line, expected
):
    with RawPeer(server.path) as peer:
        peer.send(line, b'{"cmd": "hello", "id": "after"}')
        bad, hello = peer.replies(2)
    assert bad["ok"] is False and bad["error"].startswith(expected), bad["error"]
    assert len(bad["error"]) < 200 and bad["id"] is None
    assert hello["ok"] and hello["id"] == "after"
    assert take(server, 0.1) is None  # nothing reached the run loop


@pytest.mark.parametrize("command_id", [None, 0, -(2**53), 2**53, "", "x" * 100, "ü"])
def test_a_scalar_id_is_echoed(server, command_id):
    with RawPeer(server.path) as peer:
        peer.send(encode({"cmd": "hello", "id": command_id})[:-1])
        (reply,) = peer.replies(1)
    assert reply["ok"] and reply["id"] == command_id


def test_a_bug_in_handling_one_line_is_an_error_reply_and_the_connection_goes_on(tmp_path):
    class Buggy(ChannelServer):  # the one way to have a handler raise: plant the bug
        def _answer(self, line):
            if line == b"boom":
                raise KeyError("boom")
            return super()._answer(line)

    srv = Buggy(str(tmp_path / "run.sock"), HELLO)
    try:
        with RawPeer(srv.path) as peer:
            peer.send(b"boom", b'{"cmd": "hello", "id": 2}')
            bug, hello = peer.replies(2)
    finally:
        srv.close()
    assert bug["ok"] is False and bug["error"] == "internal error: KeyError: 'boom'"
    assert hello["ok"] and hello["id"] == 2


def test_replies_keep_the_order_of_the_lines_they_answer(server):
    # an error and a hello, which the channel answers itself, wait behind a command that
    # waits for the run loop
    with RawPeer(server.path) as peer:
        peer.send(b'{"cmd": "pause", "id": 1}', b"nonsense", b'{"cmd": "hello", "id": 3}')
        time.sleep(0.5)  # all three lines read
        answer_one(server)
        assert take(server, 0.5) is None  # the loop's next look sends what waited
        replies = peer.replies(3)
    assert [(r["id"], r["ok"]) for r in replies] == [(1, True), (None, False), (3, True)]


def test_monitors_beyond_the_cap_are_refused_with_the_reason(server, clients):
    admitted = [clients(server.path) for _ in range(64)]
    with pytest.raises(ChannelError, match=r"refused this monitor: too many monitors \(64\)$"):
        ChannelClient.connect(server.path, timeout=5)
    with RawPeer(server.path) as peer:  # what any client sees: one reply, then the close
        assert peer.messages(2) == [{"type": "reply", "id": None, "cmd": "hello", "ok": False,
                                     "error": "too many monitors (64)"}]  # fmt: skip
    admitted[0].close()
    wait_until(lambda: server.monitors == 63)
    assert clients(server.path).hello == HELLO


def test_a_look_of_the_run_loop_takes_a_few_lines_at_most_the_peers_in_turn(server):
    with RawPeer(server.path) as a, RawPeer(server.path) as b:
        for peer, name in ((a, b"a"), (b, b"b")):
            peer.send(*(b'{"cmd":"pause","id":"%s%d"}' % (name, i) for i in range(16)))
        time.sleep(0.5)  # all read
        ids = [command["id"] for _, command in server.commands()]
    assert len(ids) == LINES_PER_LOOK == 8
    first, second = ids[0][0], ids[1][0]
    assert ids == [f"{name}{i}" for i in range(4) for name in (first, second)]


@pytest.mark.parametrize("line", [b'{"cmd":"resume","id":%d}', b"nonsense %d"])
def test_a_flooding_peer_is_held_back_through_its_socket_and_loses_nothing(server, line):
    # commands wait for the run loop; the channel answers errors itself, but only so many per
    # look of the run loop: both floods are held back
    count = 40_000  # about 1 MB: more than the socket's buffers hold
    with RawPeer(server.path, timeout=60) as peer:
        payload = b"".join(line % i + b"\n" for i in range(count))
        sender = threading.Thread(target=peer.sock.sendall, args=(payload,), daemon=True)
        sender.start()
        sender.join(3)
        assert sender.is_alive()  # the run loop never looked: the channel stopped reading
        replies = []
        reader = threading.Thread(target=lambda: replies.extend(peer.replies(count)))
        reader.start()
        ids = []
        while reader.is_alive():  # play the run loop
            for client, command in server.commands(wait=0.01):
                ids.append(command["id"])
                server.reply(client, command)
        sender.join(10)
    assert not sender.is_alive() and len(replies) == count
    if b"resume" in line:
        assert ids == [r["id"] for r in replies] == list(range(count))
    else:
        assert ids == [] and not any(r["ok"] for r in replies)


def test_a_socket_path_too_long_for_unix_sockets_is_refused_with_its_length(tmp_path):
    path = str(tmp_path / ("x" * 120))
    message = (
        f"cannot listen at {path}: the path is {len(os.fsencode(path))} bytes, Unix sockets"
        " allow at most 107; choose a shorter path"
    )
    with pytest.raises(ChannelError) as refused:
        ChannelServer(path, HELLO)
    assert str(refused.value) == message
    result = run_cli("--socket", path, "--preset", "tiny")
    assert result.returncode == 2 and result.stderr == f"ttt-run: error: {message}\n"
    assert os.listdir(tmp_path) == []


VALID_COMMANDS = ("hello", "pause", "resume", "clear_cache", "reset")
IGNORED_FIELDS = [b"", b',"x":1e999', b',"x":"\\u0000"', b',"x":[[[[]]]]', b',"id2":{"a":[]}']
REFUSED_ECHOING_THE_ID = [  # unknown commands; save with a path that is no string
    b'"cmd":"launch"', b'"cmd":"PAUSE"', b'"cmd":""', b'"cmd":"hello "', b'"x":1',
    b'"cmd":"save","path":5', b'"cmd":"save","path":null', b'"cmd":"save","path":["a"]',
]  # fmt: skip
REFUSED = [  # wrong types, bad ids, NUL, invalid UTF-8
    b"3", b'"pause"', b"[1]", b"true", b"null", b'{"cmd":5}', b'{"cmd":null}',
    b'{"cmd":["pause"]}', b'{"cmd":"pause","id":{}}', b'{"cmd":"pause","id":[1]}',
    b'{"cmd":"pause","id":false}', b'{"cmd":"pause","id":1e999}', b"\x00",
    b'{"cmd":"pause\x00"}', b'{"cmd":"\xff\xfe"}', b"\xc3(", b'{"cmd":"pause","x":"\xc0\xaf"}',
]  # fmt: skip


def fuzz_line(rng: random.Random, command_id: int) -> tuple[bytes, tuple[bool, Any] | None]:
    """A line for a run's channel and the (ok, id) of the reply it must get; None: no reply
    (a blank line). Lines stay far below MAX_LINE: an overlong one ends the connection."""
    line = encode({"cmd": rng.choice(VALID_COMMANDS), "id": command_id})[:-1]
    kind = rng.randrange(10)
    if kind < 3:  # valid, sometimes with odd fields, which are ignored
        return line[:-1] + rng.choice(IGNORED_FIELDS) + b"}", (True, command_id)
    if kind == 3:
        fields = rng.choice(REFUSED_ECHOING_THE_ID)
        return b"{" + fields + b',"id":%d}' % command_id, (False, command_id)
    if kind == 4:
        return rng.choice(REFUSED), (False, None)
    if kind == 5:  # random bytes: no line break, not blank
        noise = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
        return b"#" + noise.replace(b"\n", b""), (False, None)
    if kind == 6:  # truncated: no proper prefix of a JSON object is JSON
        return line[: rng.randrange(1, len(line))], (False, None)
    if kind == 7:  # deep nesting, bare (any depth) or inside a command (beyond any parser's)
        if rng.random() < 0.5:
            return b"[" * (depth := rng.randint(1, 30000)) + b"]" * depth, (False, None)
        depth = rng.randint(20000, 30000)
        return line[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}", (False, None)
    if kind == 8:  # huge numbers
        digits = b"9" * rng.randint(20, 6000)
        return rng.choice([line[: line.index(b'"id"')] + b'"id":' + digits + b"}",
                           b'{"cmd":' + digits + b"}"]), (False, None)  # fmt: skip
    return rng.choice([b" ", b"\t \r"]), None  # blank: skipped, no reply


@pytest.mark.slow
def test_fuzzing_the_channel_of_a_real_run_never_deafens_or_stops_it(spawned_run):
    rng = random.Random(20240609)
    run = spawned_run()
    watcher = connect(run)
    peers: list[RawPeer] = []
    try:
        report(watcher, lambda m: m.step >= 1)
        peers += [RawPeer(run.socket_path, timeout=60) for _ in range(3)]
        ids = itertools.count(1)
        lines = dropped = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            wanted = {}
            for peer in peers:  # a burst on every connection, then every reply, in order
                burst = [fuzz_line(rng, next(ids)) for _ in range(rng.randint(1, 40))]
                peer.send(*(line for line, _ in burst))
                wanted[peer] = [want for _, want in burst if want is not None]
                lines += len(burst)
            for peer, want in wanted.items():
                replies = peer.replies(len(want))
                assert [(r["ok"], r["id"]) for r in replies] == want
                errors = [r["error"] for r in replies if not r["ok"]]
                assert all(len(e) < 300 and "\n" not in e for e in errors), errors
            if rng.random() < 0.1:  # an overlong line: answered, then that connection is dropped
                with peers.pop(rng.randrange(len(peers))) as peer:
                    peer.sock.sendall(b"x" * (MAX_LINE + 100))
                    assert [r["error"] for r in peer.replies(2)] == ["line longer than 65536 bytes"]
                peers.append(RawPeer(run.socket_path, timeout=60))
                dropped += 1
        for peer in peers:
            peer.send(b'{"cmd":"hello","id":"last"}')  # no reply too many came before it
            assert [r["id"] for r in peer.replies(1)] == ["last"]
        assert lines > 300 and dropped > 0
        assert watcher.request("resume").ok
        step = report(watcher).step
        report(watcher, lambda m: m.step > step + 3)
        assert watcher.request("stop").ok
    finally:
        for peer in peers:
            peer.sock.close()
        watcher.close()
    assert run.wait(30) == 0
