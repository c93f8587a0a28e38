"""The local channel between a TTT run and its monitors: a Unix socket carrying JSON lines.

Same user only: the socket file is created mode 0600 (under umask 0177, so never wider, not even
for an instant), the server checks each peer's uid (SO_PEERCRED where the OS has it), and the
client refuses a socket owned by another user or open to others. Messages are plain JSON in a
closed set (ttt_runtime.protocol): nothing received is ever evaluated. No MLX here: xltop
imports this module.

Threads, so that the run loop never blocks on a monitor: the server accepts on one thread and
gives each peer a reader and a writer. Commands queue up for the run loop (`commands`),
at most MAX_PENDING per peer: beyond that the peer's reader stops reading, so a flood is held
back by the peer's own socket. The run loop takes at most LINES_PER_LOOK lines per look, and the
channel answers at most as many itself between two looks, so no flood of any kind costs a step
more than that. Every line gets one reply, in the order of the lines. Telemetry to a slow peer
keeps only the newest report, replies are never dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from ttt_runtime.protocol import (
    Bye,
    ErrorReport,
    Hello,
    Message,
    ProtocolError,
    Reply,
    Telemetry,
    decode_message,
    encode,
    parse_command,
)

MAX_LINE = 1 << 16  # bytes; a longer line is an error and the peer is dropped
MAX_ERROR = 1000  # characters of a reply's error: 6 bytes each at most in JSON, well in a line
_MAX_QUEUED = 1000  # messages waiting for a peer that does not read; beyond it, drop the peer
MAX_MONITORS = 64  # peers of one run; one more is refused with a reply saying so
MAX_PENDING = 16  # lines of one peer waiting for the run loop; its reader pauses beyond that
LINES_PER_LOOK = 8  # lines of all peers the run loop takes per look (between two steps)
# Linux's sun_path holds 108 bytes and macOS's 104, a terminating NUL included
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
_ACCEPT_RETRY_S = 0.1  # after a failed accept (out of descriptors or memory), try again
# A write to a peer already gone fails with EPIPE and never raises SIGPIPE: a process that gave
# SIGPIPE its default action back (a user's loop piped into `head`) would be killed by it.
# Linux has a flag for each send; macOS an option of the socket (SO_NOSIGPIPE, 0x1022).
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_SO_NOSIGPIPE = None if _SEND_FLAGS else getattr(socket, "SO_NOSIGPIPE", 0x1022)


class ChannelError(Exception):
    """The channel cannot be opened or used; the message says which socket and why."""


# Linux names a Unix-socket peer's uid (SO_PEERCRED); macOS's socket module has no such option,
# and there the socket's mode 0600 (in a 0700 folder by default) is what keeps others out.
PEERCRED_OPTION: int | None = getattr(socket, "SO_PEERCRED", None)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end, or None where the OS does not say."""
    if PEERCRED_OPTION is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, PEERCRED_OPTION, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def check_socket_file(path: str) -> None:
    """Raise ChannelError unless `path` is a socket of ours that no other user can open."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ChannelError(f"no run at {path}: no such socket") from None
    except OSError as exc:
        raise ChannelError(f"cannot reach {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ChannelError(f"{path} is not a socket")
    if info.st_uid != os.getuid():
        raise ChannelError(f"refusing {path}: owned by uid {info.st_uid}, not by you")
    if info.st_mode & 0o077:
        mode = oct(stat.S_IMODE(info.st_mode))
        raise ChannelError(f"refusing {path}: mode {mode} lets other users in (must be 0600)")


def _remove_stale(path: str) -> None:
    """A socket left by a dead run is removed; a live run's socket or any other file is an error."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ChannelError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise ChannelError(f"cannot check existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ChannelError(f"another run is already listening at {path}")


def _file_identity(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at `path` itself (not a link's target), or None."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class _Connection:
    """One socket with an ordered outbox drained by a writer thread."""

    def __init__(self, sock: socket.socket, on_line, on_close=None, greeting: bytes = b""):
        self.sock = sock
        self._on_line = on_line
        self._on_close = on_close
        self._cond = threading.Condition()
        # (is_telemetry, line); a greeting goes out before any reply to what the peer sends
        self._outbox: deque[tuple[bool, bytes]] = deque([(False, greeting)] if greeting else [])
        self._flushed = threading.Event()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def send(self, line: bytes, telemetry: bool = False) -> None:
        with self._cond:
            if self.closed:
                return
            if telemetry:  # only the newest report matters to a peer that is behind
                for item in [i for i in self._outbox if i[0]]:
                    self._outbox.remove(item)
            if len(self._outbox) >= _MAX_QUEUED:
                self._close_locked()
                return
            self._outbox.append((telemetry, line))
            self._flushed.clear()
            self._cond.notify()

    def flush(self, timeout: float) -> None:
        """Wait (at most `timeout`) until the outbox has gone out."""
        self._flushed.wait(timeout)

    def close(self) -> None:
        with self._cond:
            self._close_locked()

    def _close_locked(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._flushed.set()
        self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self._on_close is not None:
            self._on_close(self)

    def _write(self) -> None:
        while True:
            with self._cond:
                while not self._outbox and not self.closed:
                    self._flushed.set()
                    self._cond.wait()
                if self.closed:
                    return
                batch = b"".join(line for _, line in self._outbox)
                self._outbox.clear()
            try:
                self.sock.sendall(batch, _SEND_FLAGS)
            except OSError:
                self.close()
                return

    def _read(self) -> None:
        buffer = b""
        try:
            while not self.closed:  # what a closed connection had sent but not yet had read is lost
                data = self.sock.recv(65536)
                if not data:
                    break
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    if line.strip() and not self.closed:
                        self._on_line(self, line)
                if len(buffer) > MAX_LINE:
                    self._on_line(self, None)  # a line too long: the handler answers and drops
                    break
        except OSError:
            pass
        self.close()


def reply_line(command: dict[str, Any], ok: bool = True, error: str | None = None,
               **extra: Any) -> bytes:  # fmt: skip
    """The encoded reply to `command` (its "id" and "cmd" echoed). An error is cut to
    MAX_ERROR characters: one that echoes a long argument (a path) must still fit a line."""
    if error is not None and len(error) > MAX_ERROR:
        error = error[:MAX_ERROR] + "..."
    return encode(Reply(command.get("id"), command.get("cmd"), ok, error, extras=extra))


class ChannelServer:
    """The run's end: accepts monitors, pushes messages to all, queues their commands.

    Each peer's lines wait in its own queue, whether a command for the run loop or a reply the
    channel wrote itself (an error, `hello`): so replies keep the order of the lines, and a
    peer's reader waits while its queue is full. The run loop takes the queues in turn."""

    def __init__(self, socket_path: str, hello: Hello):
        self.path = socket_path
        self.hello = hello
        self._peers: set[_Connection] = set()
        self._lock = threading.Lock()
        # Lock order: _queued, then a peer's own lock, then _lock; never the other way round.
        self._queued = threading.Condition()
        self._queues: dict[_Connection, deque[dict[str, Any] | bytes]] = {}
        self._turns: deque[_Connection] = deque()  # peers with queued lines, in turn
        self._in_hand: _Connection | None = None  # whose command the run loop is obeying
        self._answered = 0  # lines the channel answered at once since the run loop looked
        self._closing = False
        if not socket_path or "\0" in socket_path:  # "": Linux's bind() makes up a name
            raise ChannelError(f"cannot listen at {socket_path!r}: not a path")
        size = len(os.fsencode(socket_path))
        if size > MAX_SOCKET_PATH:
            raise ChannelError(
                f"cannot listen at {socket_path}: the path is {size} bytes, Unix sockets allow"
                f" at most {MAX_SOCKET_PATH}; choose a shorter path"
            )
        _remove_stale(socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(socket_path)
        except OSError as exc:
            listener.close()
            raise ChannelError(f"cannot listen at {socket_path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(socket_path, 0o600)
        self._identity = _file_identity(socket_path)  # what close() may remove
        listener.listen(16)
        listener.settimeout(0.2)  # so that close() is noticed without a wake-up trick
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def monitors(self) -> int:
        with self._lock:
            return len(self._peers)

    def publish(self, message: Message) -> None:
        line = encode(message)
        telemetry = isinstance(message, Telemetry)
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            peer.send(line, telemetry=telemetry)

    def reply(self, peer: _Connection, command: dict[str, Any], ok: bool = True,
              error: str | None = None, **extra: Any) -> None:  # fmt: skip
        peer.send(reply_line(command, ok, error, **extra))

    def commands(self, wait: float = 0.0) -> Iterator[tuple[_Connection, dict[str, Any]]]:
        """One look at the queues by the run loop: the commands waiting, (peer, command), the
        peers in turn, LINES_PER_LOOK lines at most. The first may take `wait` seconds to come;
        the caller obeys and answers each before asking for the next. Replies the channel wrote
        itself that waited behind a command go out on the way and count among the lines."""
        with self._queued:
            self._in_hand, self._answered = None, 0
        deadline = time.monotonic() + wait
        for _ in range(LINES_PER_LOOK):
            with self._queued:
                if not self._queued.wait_for(lambda: self._turns, deadline - time.monotonic()):
                    return
                peer = self._turns.popleft()
                line = self._queues[peer].popleft()
                if self._queues[peer]:
                    self._turns.append(peer)
                else:
                    del self._queues[peer]
                self._queued.notify_all()  # that peer's reader may be waiting for room
                if isinstance(line, bytes):
                    peer.send(line)  # under the lock: no later reply of the peer's overtakes it
                    continue
                self._in_hand = peer
            yield peer, line
            with self._queued:
                self._in_hand = None  # obeyed and answered
            deadline = time.monotonic()

    def close(self, flush_timeout: float = 2.0) -> None:
        """Stop accepting, deliver what is queued (bounded), close every peer, remove the file."""
        self._closing = True
        with self._queued:
            self._queued.notify_all()  # readers waiting for room give up
        self._accepter.join(2.0)
        # only our own socket: once it was deleted, another run may listen at the same path.
        # Checked while the listener is open: until then no other file can have its inode.
        if _file_identity(self.path) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._listener.close()
        self._identity = None  # a second close() finds no file of ours
        with self._lock:
            peers = list(self._peers)
        deadline = time.monotonic() + flush_timeout
        for peer in peers:
            peer.flush(max(0.0, deadline - time.monotonic()))
            peer.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                # out of descriptors (EMFILE, ENFILE), buffers or memory: the listener is
                # fine and a peer that closes frees what is missing; only close() ends this
                time.sleep(_ACCEPT_RETRY_S)
                continue
            try:
                self._admit(conn)
            except (OSError, RuntimeError):  # its threads could not start: that peer is lost
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        if _SO_NOSIGPIPE is not None:
            conn.setsockopt(socket.SOL_SOCKET, _SO_NOSIGPIPE, 1)
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            conn.close()  # another user: refused before a byte is read
            return
        # Counted among the peers before the hello can go out: a monitor that has been
        # greeted then receives everything published after (publish takes the same lock).
        with self._lock:
            full = len(self._peers) >= MAX_MONITORS
            if not full:
                peer = _Connection(conn, self._on_line, self._forget, greeting=encode(self.hello))
                self._peers.add(peer)
        if full:  # told why, in place of the hello, then closed: no threads spent on it
            conn.settimeout(1.0)  # one short line into an empty socket buffer
            refusal = f"too many monitors ({MAX_MONITORS})"
            with contextlib.suppress(OSError):
                conn.sendall(reply_line({"cmd": "hello"}, ok=False, error=refusal), _SEND_FLAGS)
            conn.close()

    def _forget(self, peer: _Connection) -> None:
        with self._lock:
            self._peers.discard(peer)

    def _on_line(self, peer: _Connection, line: bytes | None) -> None:
        if line is None:  # too long: answered at once, then the reader drops the peer
            peer.send(reply_line({}, ok=False, error=f"line longer than {MAX_LINE} bytes"))
            peer.flush(1.0)
            return
        try:
            answer = self._answer(line)
        except Exception as exc:  # a bug in handling one line must not deafen the connection
            answer = reply_line({}, ok=False, error=f"internal error: {type(exc).__name__}: {exc}")
        self._enqueue(peer, answer)

    def _answer(self, line: bytes) -> dict[str, Any] | bytes:
        """A command for the run loop, or the reply to the line when the channel can tell it."""
        try:
            command = parse_command(line)
        except ProtocolError as exc:
            return reply_line(exc.echo, ok=False, error=str(exc))
        if command["cmd"] == "hello":
            return reply_line(command, **dataclasses.asdict(self.hello))
        return command

    def _enqueue(self, peer: _Connection, answer: dict[str, Any] | bytes) -> None:
        """Queue a peer's command or reply behind its earlier ones; wait while its queue is full.
        A reply with nothing of the peer's before it goes out at once, LINES_PER_LOOK of them
        between two looks of the run loop."""
        with self._queued:
            self._queued.wait_for(lambda: self._room_or_gone(peer))
            if self._closing or peer.closed:
                return
            if (isinstance(answer, bytes) and peer not in self._queues
                    and self._in_hand is not peer and self._answered < LINES_PER_LOOK):  # fmt: skip
                self._answered += 1
                peer.send(answer)
                return
            if peer not in self._queues:
                self._queues[peer] = deque()
                self._turns.append(peer)
            self._queues[peer].append(answer)
            self._queued.notify_all()

    def _room_or_gone(self, peer: _Connection) -> bool:
        return self._closing or peer.closed or len(self._queues.get(peer, ())) < MAX_PENDING


class ChannelClient:
    """A monitor's end: a reader thread keeps the newest telemetry; requests wait for replies."""

    def __init__(self, sock: socket.socket, path: str):
        self.path = path
        self.hello: Hello | None = None
        self.last_error: ErrorReport | None = None
        self.bye: Bye | None = None
        self.refusal: str | None = None  # why the run refused this monitor, in place of a hello
        self._latest: Telemetry | None = None
        self._replies: dict[int | str, Reply] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._conn = _Connection(sock, self._on_line, self._on_close)

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> ChannelClient:
        """Connect and wait for the run's hello; ChannelError within `timeout` otherwise."""
        check_socket_file(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            sock.close()
            raise ChannelError(f"no run is listening at {path} (left by a dead run?)") from None
        except OSError as exc:
            sock.close()
            raise ChannelError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        sock.settimeout(None)
        client = cls(sock, path)
        with client._cond:
            client._cond.wait_for(lambda: client.hello or not client.alive, timeout)
        if client.hello is None:
            client.close()
            if client.refusal:
                raise ChannelError(f"{path} refused this monitor: {client.refusal}")
            raise ChannelError(f"{path} did not greet within {timeout:g} s")
        return client

    @property
    def alive(self) -> bool:
        return not self._conn.closed

    def latest(self) -> Telemetry | None:
        """The newest telemetry message (never blocks)."""
        return self._latest

    def request(self, cmd: str, timeout: float = 5.0, **fields: Any) -> Reply:
        """Send a command and return the run's reply; ChannelError if none within `timeout`."""
        if not self.alive:
            raise ChannelError(f"the run at {self.path} has closed its channel")
        request_id = next(self._ids)
        self._conn.send(encode({"cmd": cmd, "id": request_id, **fields}))
        with self._cond:
            self._cond.wait_for(lambda: request_id in self._replies or not self.alive, timeout)
            reply = self._replies.pop(request_id, None)
        if reply is not None:
            return reply
        if not self.alive:
            raise ChannelError(f"the run at {self.path} closed its channel before replying")
        raise ChannelError(f"no reply to {cmd!r} within {timeout:g} s")

    def close(self) -> None:
        self._conn.close()

    def _on_line(self, _conn: _Connection, line: bytes | None) -> None:
        if line is None:
            return
        try:
            message = decode_message(line)
        except ProtocolError:
            return  # a broken or malformed message is skipped; the last good one stands
        with self._cond:
            if isinstance(message, Telemetry):
                self._latest = message
            elif isinstance(message, Hello):
                self.hello = message
            elif isinstance(message, Reply) and message.id is not None:
                self._replies[message.id] = message
            elif isinstance(message, Reply) and self.hello is None:
                self.refusal = message.error
            elif isinstance(message, ErrorReport):
                self.last_error = message
            elif isinstance(message, Bye):
                self.bye = message
            self._cond.notify_all()

    def _on_close(self, _conn: _Connection) -> None:
        with self._cond:
            self._cond.notify_all()
