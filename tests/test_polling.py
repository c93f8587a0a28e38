"""The tests' one polling helper: returns what it waited for, fails naming it, never hangs."""

import time

import pytest
from polling import wait_until


def test_wait_until_returns_the_first_true_value():
    values = iter([None, 0, "", "ready", "later"])
    assert wait_until(lambda: next(values), 5, interval=0.001) == "ready"


def test_wait_until_fails_after_the_timeout_describing_the_state_then():
    described = []

    def what() -> str:
        described.append(time.monotonic())
        return "the answer (still none)"

    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"after 0\.2 s waiting for the answer \(still none"):
        wait_until(lambda: None, 0.2, what, interval=0.01)
    assert 0.2 <= time.monotonic() - start < 5
    assert len(described) == 1  # described once, at the failure only
