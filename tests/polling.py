"""The tests' one way to wait: `from polling import wait_until` in any test folder (pytest
puts tests/ on sys.path, as it holds the root conftest.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

from ttt_runtime.channel import ChannelClient, ChannelError
from ttt_runtime.launch import RunProcess

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.05,
) -> T:
    """Call `predicate` every `interval` s until it returns something true, and return that.
    After `timeout` s fail naming `what`: a string, or a function that describes the state then
    (what the screen shows, where the run is). An AssertionError the predicate raises (a process
    that died while being waited for) ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {_text(what)}")
        time.sleep(interval)


def _text(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def run_client(run: RunProcess, timeout: float) -> ChannelClient:
    """A client of `run`'s channel once its socket answers (importing MLX takes a while); fails
    at once, with the run's stderr, if the run exits first."""

    def answering() -> ChannelClient | None:
        assert run.poll() is None, f"run exited {run.poll()}: {run.stderr_tail()}"
        with contextlib.suppress(ChannelError):
            return ChannelClient.connect(run.socket_path, timeout=5.0)
        return None

    return wait_until(answering, timeout, f"run {run.pid}'s socket to answer", interval=0.1)
