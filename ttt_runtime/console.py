"""The run's stderr, which may be gone: when the monitor reading it is SIGKILLed, it is a broken
pipe. No MLX here: `__main__` writes through it before MLX is imported."""

from __future__ import annotations

import contextlib
import sys


def say(text: str) -> None:
    """Write `text` and a newline to stderr; a closed or broken stderr never ends the run."""
    with contextlib.suppress(OSError):  # BrokenPipeError, or EIO from a closed terminal
        print(text, file=sys.stderr, flush=True)
