"""Fixtures shared by every test directory: a real TTT run in a real child process."""

from __future__ import annotations

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
