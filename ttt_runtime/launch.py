"""Starting a TTT run as a child process, and stopping it for sure.

The run is a fresh interpreter (`python -m ttt_runtime run`), never a fork: MLX is not
fork-safe, and LD_PRELOAD of an optimized BLAS only takes effect at exec. No MLX here: xltop
imports this module.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO

from ttt_runtime.blas import preload_environment
from ttt_runtime.channel import ChannelClient, ChannelError
from ttt_runtime.config import ConfigError, parse_run_args, placement_from_args

_TAIL_LINES = 200
SLOW_STOP_S = 1.0  # a stop that takes longer says what it waits for
# What a run takes as `stop`: SIGTERM, Ctrl-C, and SIGHUP (the terminal it was started in closed)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def private_socket_path() -> str:
    """A socket path inside a fresh directory only this user can enter (mode 0700). Whoever
    asks for one removes it with `remove_private_socket`; a run told `--remove-socket-dir`
    does so itself when it exits."""
    return os.path.join(tempfile.mkdtemp(prefix="ttt-run-"), "run.sock")


def remove_private_socket(socket_path: str) -> None:
    """Remove the socket (a dead run's may be left) and its folder, unless something else was
    put there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(socket_path))


def check_run_args(argv: list[str]) -> str | None:
    """The one-line error `ttt-run run ARGV` would exit with before training (its values,
    settings file, checkpoint header and data path), or None."""
    try:
        placement_from_args(*parse_run_args(argv))
    except ConfigError as exc:
        return str(exc)
    return None


def run_environment(preload_blas: bool) -> dict[str, str]:
    """The child's environment: unbuffered, and the optimized BLAS preloaded when wanted."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(preload_environment(env, enabled=preload_blas))
    return env


class RunProcess:
    """A spawned run: its pid, socket, exit code and the tail of its stderr."""

    def __init__(self, popen: subprocess.Popen[str], socket_path: str, private: bool):
        if popen.stderr is None:  # its tail is what explains a failed run
            raise ValueError(
                "RunProcess reads the run's stderr: start it with stderr=subprocess.PIPE"
            )
        self.popen = popen
        self.socket_path = socket_path
        self._private = private  # its folder was made for it: removed once it has exited
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._reader = threading.Thread(target=self._read_stderr, args=(popen.stderr,), daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stderr_tail(self) -> str:
        return "".join(self._tail)

    def stop(self, timeout: float = 10.0, on_wait: Callable[[str], None] | None = None) -> int:
        """Ask the run to stop (it finishes its step and exits 0) and kill it if it has not
        exited `timeout` seconds later. If that takes over SLOW_STOP_S, `on_wait(sentence)`
        hears once what it waits for. Returns the exit code; always reaps the process."""
        if self.popen.poll() is None:
            start = time.monotonic()
            deadline, slow = start + timeout, min(start + SLOW_STOP_S, start + timeout)
            # A SIGSTOPped run acts on nothing, not even SIGTERM: continued, it finishes its
            # step and exits cleanly like any other (SIGCONT does nothing to a running one).
            self.popen.send_signal(signal.SIGCONT)
            client = self._ask_to_stop(slow, timeout)
            try:  # the channel stays open until the run exits: the command may still be queued
                if not self._exited_by(slow) and on_wait:
                    left = math.ceil(deadline - time.monotonic())
                    on_wait(f"stopping the run (pid {self.pid}): waiting up to {left} s for it "
                            "to finish its step and exit, then killing it")  # fmt: skip
                if not self._exited_by(deadline):
                    self.popen.kill()
                    self.popen.wait()
            finally:
                if client is not None:
                    client.close()
        self._reader.join(2.0)
        if self._private:  # the run removes it as it exits, unless it was killed
            remove_private_socket(self.socket_path)
        return self.popen.returncode

    def _ask_to_stop(self, reply_by: float, timeout: float) -> ChannelClient | None:
        """Send the stop command (the run obeys it between steps; its reply is awaited until
        `reply_by` at most) and return the open channel, or SIGTERM (which the run takes the
        same way) if it has none within `timeout` (e.g. while it imports MLX)."""
        try:
            client = ChannelClient.connect(self.socket_path, timeout=min(2.0, timeout))
        except (ChannelError, OSError):
            self.popen.terminate()
            return None
        with contextlib.suppress(ChannelError, OSError):
            client.request("stop", timeout=max(0.0, reply_by - time.monotonic()))
        return client

    def _exited_by(self, deadline: float) -> bool:
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    def _read_stderr(self, stderr: IO[str]) -> None:
        for line in stderr:
            self._tail.append(line)


def spawn_run(
    args: list[str], socket_path: str | None = None, preload_blas: bool = True
) -> RunProcess:
    """Start `python -m ttt_runtime run --socket PATH ARGS` (a fresh interpreter); without a
    `socket_path`, in a private folder the run removes as it exits (even if we are killed)."""
    private = socket_path is None
    if socket_path is None:
        socket_path = private_socket_path()
    command = [sys.executable, "-m", "ttt_runtime", "run", "--socket", socket_path]
    if private:
        command.append("--remove-socket-dir")
    if not preload_blas:  # the run then keeps quiet about the bundled BLAS: it was asked for
        command.append("--no-blas-preload")
    popen = subprocess.Popen(
        [*command, "--exit-with-parent", *args],
        # A lifeline: nobody writes to this pipe, but when the monitor dies (even SIGKILLed)
        # its end closes, the run reads EOF and stops, so no orphaned run keeps training.
        stdin=subprocess.PIPE,
        # its own session: a terminal's Ctrl-C reaches xltop alone, which then stops the run
        # in order (stop command, flush, exit 0) instead of racing it
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=run_environment(preload_blas),
    )
    return RunProcess(popen, socket_path, private)
