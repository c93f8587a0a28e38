"""Units and number formats shared by every view (the TUI, the `--once` table, the status line,
the CSV and the watchdog): short, fixed-width friendly, '-' for unknown."""

from __future__ import annotations

import contextlib
import re
import signal

MIB = 1024 * 1024  # the CSV's and the limits' unit
MISSING = "-"


def size(value: int | float | None) -> str:
    """Bytes as B/KiB/MiB/GiB with three significant figures."""
    if value is None:
        return MISSING
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.3g} {unit}"


# Control characters (C0, DEL, C1): written raw, a string from elsewhere (a process's command line,
# a run's error, an actor's name) would move the cursor, clear or retitle the terminal.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with each control character written as its escape (`\\x1b`), never obeyed."""
    return CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], text)


def number(value: float | None, digits: int = 3) -> str:
    """A float with `digits` significant figures, or '-'."""
    return MISSING if value is None else f"{value:.{digits}g}"


def ms(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def rate(value: float | None) -> str:
    """Tokens per second, thousands as k."""
    if value is None:
        return MISSING
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


def ending(exit_code: int | None) -> str:
    """How a process ended, as a person reads it: "exit code 2", or "killed by SIGSEGV" for
    the negative codes that say a signal ended it."""
    if exit_code is None:
        return "exit code unknown"
    if exit_code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exit_code).name}"
    return f"exit code {exit_code}"
