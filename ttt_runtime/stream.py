"""Byte streams for a byte-level model: a file, a folder of text files, or the embedded default.

The default is text every Python install carries, found at run time so nothing is downloaded:
the running interpreter's own standard-library sources (their docstrings are its docs) and
any .txt/.rst beside them. The files are read as one long concatenation that wraps around.
"""

from __future__ import annotations

import bisect
import itertools
import os
import stat
import sys
import sysconfig
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

_SNIFF_BYTES = 8192
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
_DEFAULT_SUFFIXES = (".py", ".txt", ".rst")
_BLOCK_BYTES = 1 << 20  # files are read and kept this much at a time
_CACHED_BLOCKS = 8  # blocks kept in memory: consecutive chunks mostly fall in the same one
CHECK_FILES = 1000  # check_data sniffs at most this many files (8 MiB) before a run starts


class StreamError(ValueError):
    """A data path that cannot be streamed (missing, empty, unreadable, not text)."""


def _is_text(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        # a multi-byte character cut by the sniff window is still text
        return err.start >= len(head) - 3 and len(head) == _SNIFF_BYTES
    return True


def _open_nonblocking(path: str, flags: int) -> int:
    # a FIFO put in a data file's place would block the opening until someone writes
    return os.open(path, flags | os.O_NONBLOCK)


def _walk(root: Path, suffixes: tuple[str, ...] | None) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if suffixes is None or name.endswith(suffixes):
                yield Path(folder) / name


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


class _Source:
    """What a stream of `path` reads: the files it considers, in order, found lazily, and
    which of them are text (size > 0, and the first 8 KiB look like UTF-8)."""

    def __init__(self, path: str | None):
        if path is None:
            self.root = default_corpus_root()
            self.candidates = _walk(self.root, _DEFAULT_SUFFIXES)
            self.where = f"the Python standard library at {self.root}"
            self.is_file = False
            return
        self.root = Path(path).expanduser()
        self.where = f"data path {path}"
        try:
            mode = self.root.stat().st_mode
        except FileNotFoundError:
            raise StreamError(f"{self.where} does not exist") from None
        except OSError as err:  # a name too long, a symlink loop, a folder we may not enter
            raise StreamError(f"{self.where}: {err.strerror}") from None
        self.is_file = stat.S_ISREG(mode)
        if self.is_file:
            self.candidates = iter([self.root])
        elif stat.S_ISDIR(mode):
            self.candidates = _walk(self.root, None)
        else:  # a device such as /dev/urandom, a FIFO, a socket
            raise StreamError(f"{self.where} is neither a file nor a folder")

    def text_files(self, candidates: Iterable[Path]) -> Iterator[tuple[Path, int]]:
        """(file, size) for each text file among `candidates`."""
        for file in candidates:
            try:
                size = file.stat().st_size
                text = size > 0 and _is_text(file)
            except OSError as err:
                if self.is_file:
                    raise StreamError(f"{self.where} is unreadable: {err.strerror}") from None
                continue  # one unreadable file in a folder is skipped, like a binary one
            if text:
                yield file, size

    def nothing_to_stream(self) -> StreamError:
        if self.is_file:
            reason = "is empty" if self.root.stat().st_size == 0 else "is not a text file"
            return StreamError(f"{self.where} {reason}")
        return StreamError(f"{self.where} holds no non-empty text files")


def check_data(path: str, max_files: int = CHECK_FILES) -> None:
    """Raise the StreamError that `ByteStream(path)` would for a path with nothing to stream,
    sniffing at most `max_files` files (8 KiB each): the first text file ends the search, and a
    folder whose first `max_files` files are not text is left to the stream to judge."""
    source = _Source(path)
    first = list(itertools.islice(source.candidates, max_files + 1))
    if len(first) <= max_files and next(source.text_files(first), None) is None:
        raise source.nothing_to_stream()


class ByteStream:
    """Iterating yields (inputs, targets): int32 arrays (batch_size, seq_len), targets shifted
    by one byte. Endless (wraps around). Row b reads its own contiguous lane starting
    b * (total // batch_size) bytes in, so each row continues across chunks like one long
    conversation. `position` counts the bytes consumed per row (pass it back to resume).
    """

    def __init__(self, path: str | None, seq_len: int, batch_size: int = 1, position: int = 0):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StreamError(f"{name}={value!r}: must be an integer >= 1")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise StreamError(f"position={position!r}: must be an integer >= 0")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.position = position
        self.path = path
        self.files, sizes = self._collect(path)
        self.ends = np.cumsum(sizes).tolist()
        self.total = self.ends[-1]
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def _collect(self, path: str | None) -> tuple[list[Path], list[int]]:
        source = _Source(path)
        found = list(source.text_files(source.candidates))
        if not found:
            raise source.nothing_to_stream()
        return [file for file, _ in found], [size for _, size in found]

    def describe(self) -> str:
        source = (
            f"Python {sys.version_info.major}.{sys.version_info.minor} standard library "
            f"({default_corpus_root()})"
            if self.path is None
            else str(self.path)
        )
        return f"{source}: {len(self.files)} text files, {self.total / 1e6:.1f} MB"

    def __iter__(self) -> ByteStream:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        lane = self.total // self.batch_size
        rows = [
            self.read(self.position + b * lane, self.seq_len + 1) for b in range(self.batch_size)
        ]
        self.position += self.seq_len
        window = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(self.batch_size, -1)
        window = window.astype(np.int32)
        return window[:, :-1], window[:, 1:]

    def read(self, start: int, count: int) -> bytes:
        """`count` bytes of the endless concatenation from offset `start` (wrapping around)."""
        out = []
        offset = start % self.total
        while count > 0:
            index = bisect.bisect_right(self.ends, offset)
            within = offset - (self.ends[index - 1] if index else 0)
            block_start, data = self._block(index, within // _BLOCK_BYTES)
            piece = data[within - block_start : within - block_start + count]
            out.append(piece)
            count -= len(piece)
            offset = (offset + len(piece)) % self.total
        return b"".join(out)

    def _block(self, index: int, number: int) -> tuple[int, bytes]:
        """Block `number` of file `index`: its offset in the file and its bytes. Files are read
        a block at a time, so that a file larger than memory streams all the same."""
        start = number * _BLOCK_BYTES
        if (index, number) in self._cache:
            self._cache.move_to_end((index, number))
            return start, self._cache[index, number]
        size = min(_BLOCK_BYTES, self.ends[index] - (self.ends[index - 1] if index else 0) - start)
        try:
            with open(self.files[index], "rb", opener=_open_nonblocking) as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # replaced since the scan
                    raise OSError(0, "no longer a regular file")
                handle.seek(start)
                data = handle.read(size)
        except OSError as err:
            raise StreamError(
                f"data file {self.files[index]} is unreadable: {err.strerror}"
            ) from None
        # a file that changed size since the scan keeps its scanned length: offsets stay valid
        data = data.ljust(size, b"\n")
        self._cache[index, number] = data
        # every row reads its own lane: one block each, and the next a row runs into
        if len(self._cache) > max(_CACHED_BLOCKS, 2 * self.batch_size):
            self._cache.popitem(last=False)
        return start, data
