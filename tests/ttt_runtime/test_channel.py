"""The channel over real Unix sockets: server and clients in this process, on threads."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time

import pytest

from ttt_runtime.channel import ChannelClient, ChannelError, ChannelServer
from ttt_runtime.protocol import decode

HELLO = {"pid": os.getpid(), "run_id": "test", "mode": "train", "preset": "tiny", "config": {}}


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


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


def raw_exchange(path: str, payload: bytes) -> list[dict]:
    """Send raw bytes on a plain socket; return the messages up to the first reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(payload)
    messages, buffer = [], b""
    while not any(m.get("type") == "reply" for m in messages):
        data = sock.recv(65536)
        if not data:
            break
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        messages += [decode(line) for line in lines if line]
    sock.close()
    return messages


def answer_one(server, **extra):
    """Play the run loop once: take the next command and reply to it."""
    peer, command = wait_until(lambda: server.next_command(0.05))
    server.reply(peer, command, **extra)
    return command


def test_hello_and_telemetry_reach_every_client(server, clients):
    first, second = clients(server.path), clients(server.path)
    assert first.hello["run_id"] == "test" and second.hello["pid"] == os.getpid()
    assert first.latest() is None
    wait_until(lambda: server.monitors == 2)
    for step in (1, 2, 3):
        server.publish({"type": "telemetry", "step": step})
    for client in (first, second):
        wait_until(lambda c=client: (c.latest() or {}).get("step") == 3)


def test_request_gets_its_reply(server, clients):
    client = clients(server.path)
    replies = []
    thread = threading.Thread(target=lambda: replies.append(client.request("pause", timeout=10)))
    thread.start()
    command = answer_one(server, note="paused")
    thread.join(10)
    assert command["cmd"] == "pause"
    assert replies == [
        {"type": "reply", "id": command["id"], "cmd": "pause", "ok": True, "error": None,
         "note": "paused"}
    ]  # fmt: skip


def test_hello_command_is_answered_by_the_channel(server, clients):
    reply = clients(server.path).request("hello", timeout=10)
    assert reply["ok"] and reply["run_id"] == "test"
    assert server.next_command(0.1) is None  # never reaches the run loop


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
    assert server.next_command(0.1) is None
    # the server still serves
    client = clients(server.path)
    assert client.request("hello", timeout=10)["ok"]


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
        assert clients(path).hello["run_id"] == "test"
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


def test_missing_socket_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(ChannelError, match="no such socket"):
        ChannelClient.connect(str(tmp_path / "nothing.sock"), timeout=5)
    assert time.monotonic() - start < 1.0


def test_closing_is_seen_at_once_and_requests_fail_cleanly(tmp_path, clients):
    srv = ChannelServer(str(tmp_path / "run.sock"), HELLO)
    client = clients(srv.path)
    srv.publish({"type": "error", "exc_type": "RuntimeError", "message": "boom", "traceback": ""})
    srv.close()
    wait_until(lambda: not client.alive, timeout=2)
    assert client.last_error["message"] == "boom"
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
        server.publish({"type": "error", "exc_type": "E", "message": str(i), "traceback": ""})
        wait_until(lambda c=client: c.last_error is not None, timeout=2)
        assert client.last_error["message"] == str(i)
        client.close()
