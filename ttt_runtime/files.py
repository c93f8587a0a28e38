"""Reading a small file a user names (a settings file, a token) without hanging on a FIFO or
reading a device forever. No MLX here: xltop imports this module."""

from __future__ import annotations

import os
import stat


class NotARegularFile(OSError):
    """The path names a FIFO, a device, a folder or a socket; `mode` says which."""

    def __init__(self, mode: int):
        super().__init__("not a regular file")
        self.mode = mode


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most `limit` + 1 bytes of the regular file at `path` (one more than allowed, so the
    caller can tell a file over its limit). OSError when it cannot be opened or read,
    NotARegularFile for anything but a regular file."""
    # O_NONBLOCK: opening a FIFO with no writer must not wait for one
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(mode)
        return f.read(limit + 1)
