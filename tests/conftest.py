"""Fixtures shared by every test directory: a real TTT run in a real child process, and a
forked child that is another user."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from ttt_runtime.launch import RunProcess, spawn_run


@pytest.fixture
def spawned_run():
    """Factory: `spawned_run(*args, socket_path=None, preload_blas=True) -> RunProcess`, a
    `python -m ttt_runtime run` child with the `tiny` preset unless ARGS name another one.
    Every run started is stopped (stop command, then terminate/kill) at teardown."""
    runs: list[RunProcess] = []

    def start(*args: str, socket_path: str | None = None, preload_blas: bool = True):
        argv = list(args)
        if "--preset" not in argv and "--resume" not in argv:
            argv = ["--preset", "tiny", *argv]
        run = spawn_run(argv, socket_path=socket_path, preload_blas=preload_blas)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop(timeout=10.0)


NOBODY = 65534


@pytest.fixture
def as_nobody() -> Callable[[Callable[[], str]], str]:
    """Factory: `as_nobody(fn)` runs `fn()` in a forked child that has become uid/gid nobody and
    returns the string it returned. The child runs the code already loaded in this process, so it
    needs no access to the checkout, which may sit in a folder only its owner can enter (root's
    home). Skips unless root, as only root can become another user."""

    def run(fn: Callable[[], str]) -> str:
        if os.geteuid() != 0:
            pytest.skip("needs root, to become another user")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: leaves by os._exit only, never back into pytest
            status, message = 1, ""
            try:
                os.close(read_end)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(60)  # a hung child dies and the parent reports it
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                message = fn()
                status = 0
            except BaseException as exc:
                message = f"{type(exc).__name__}: {exc}"
            try:
                os.write(write_end, message.encode())
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"the child as nobody failed: {message}"
        return message

    return run


@pytest.fixture
def unusable_run_inputs(tmp_path) -> list[tuple[list[str], str]]:
    """Run flags that xltop and ttt-run alike must refuse before a run starts, each with words
    its one-line message must hold: out-of-range numbers, a FIFO (opening it would block),
    /dev/zero (reading it never ends), an oversized or non-UTF-8 settings file, a folder with
    nothing to stream, one of binary files only, a device as data, and empty paths."""
    fifo, empty, binary = tmp_path / "fifo", tmp_path / "empty", tmp_path / "binary"
    os.mkfifo(fifo)
    empty.mkdir()
    binary.mkdir()
    (binary / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    big, latin1 = tmp_path / "big.toml", tmp_path / "latin1.toml"
    big.write_text("# a comment line\n" * 70_000)  # 1.2 MB
    latin1.write_bytes("data = 'caf\xe9'\n".encode("latin-1"))
    return [
        (["--seed", str(2**64)], "seed=18446744073709551616: must be an integer from 0 to"),
        (["--seed", "nan"], "seed='nan': must be an integer"),
        (["--config", "/dev/zero"], "config /dev/zero is a character device, not a regular"),
        (["--config", str(fifo)], f"config {fifo} is a FIFO"),
        (["--config", str(big)], f"config {big} is over 1 MiB"),
        (["--config", str(latin1)], f"config {latin1}: not valid TOML"),
        (["--resume", str(fifo)], f"checkpoint {fifo} is a FIFO"),
        (["--resume", str(empty)], f"checkpoint {empty} is a folder"),
        (["--data", str(empty)], f"data path {empty} holds no non-empty text files"),
        (["--data", str(binary)], f"data path {binary} holds no non-empty text files"),
        (["--data", "/dev/urandom"], "data path /dev/urandom is neither a file nor a folder"),
        # an empty path is a mistake, never "not given" (--data '' would stream the cwd)
        (["--data", ""], "--data: empty value"),
        (["--config", ""], "--config: empty value"),
        (["--resume", ""], "--resume: empty value"),
    ]
