"""The CSV sink: one schema, one row per Snapshot, every column named with its unit.

The block and layer columns are fixed for the file by the first Snapshot (one column per block
and per layer), and so are the cluster's (when a Ray cluster is watched: empty cells while it is
unreachable), and so are a user loop's extra scalars (`user_<name>`, ttt_runtime.report: one
first reported later has no column), and so are a Ray run's stage actors (`stage<k>r<r>_*`, one
set per stage and replica). Each row goes straight to the file (no buffer) and a write
that fails or falls short, as on a full disk, is cut back to the last whole row: the file holds
whole rows only. A monitor killed mid-write can still leave half a row; reopening the file drops
it. A file that does not begin with xltop's header is never modified.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from stat import S_ISREG
from typing import Any

from ttt_runtime.protocol import BlockTiming, LayerFigures, WorkerFigures
from xltop.snapshot import Snapshot
from xltop.units import MIB, printable

BASE_COLUMNS = (
    "ts", "interval_s",
    "total_mib", "used_mib", "avail_mib", "cpu_pct",
    "run_state", "run_pid", "rss_mib", "run_cpu_pct",
    "step", "tokens", "tokens_per_s", "step_ms", "loss_bpb", "inner_lr", "conversation",
    "sampled_step", "baseline_bpb", "gain",
    "mlx_active_mib", "mlx_cache_mib", "mlx_peak_mib", "mlx_limit_mib",
)  # fmt: skip
# The watched Ray cluster summed up (the full detail goes to JSON): CPU and memory of its hosts.
CLUSTER_COLUMNS = (
    "ray_nodes_alive", "ray_nodes_total", "ray_actors_alive", "ray_actors_total", "ray_restarts",
    "ray_object_store_used_mib", "ray_cpu_pct", "ray_memory_used_mib",
)  # fmt: skip
BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(BlockTiming))
LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerFigures))
# A Ray run's stage actor (protocol.WorkerFigures; its node goes to JSON): column -> (field, unit)
WORKER_COLUMNS = {
    "pid": ("pid", 1), "restarts": ("restarts", 1), "rss_mib": ("rss", MIB),
    "mlx_active_mib": ("active", MIB), "mlx_peak_mib": ("peak", MIB), "fwd_ms": ("fwd_ms", 1),
    "bwd_ms": ("bwd_ms", 1), "wait_ms": ("wait_ms", 1), "sync_ms": ("sync_ms", 1),
    "sent_kib": ("sent", 1024),
    "received_kib": ("received", 1024),
}  # fmt: skip


class CsvLogError(Exception):
    """A CSV log that cannot be opened or written; the message names the path and the cause."""


def csv_columns(
    n_blocks: int,
    n_layers: int,
    cluster: bool = False,
    user: tuple[str, ...] = (),
    workers: tuple[str, ...] = (),
) -> list[str]:
    blocks = [f"block{i}_{f}" for i in range(n_blocks) for f in BLOCK_FIELDS]
    layers = [f"layer{i}_{f}" for i in range(n_layers) for f in LAYER_FIELDS]
    scalars = [f"user_{name}" for name in user]
    cluster_columns = CLUSTER_COLUMNS if cluster else ()
    actors = [f"{label}_{column}" for label in workers for column in WORKER_COLUMNS]
    return [*BASE_COLUMNS, *cluster_columns, *blocks, *layers, *scalars, *actors, "event"]


def worker_label(worker: WorkerFigures) -> str:
    return f"stage{worker.stage}r{worker.replica}"


def layout(snapshot: Snapshot) -> tuple[int, int, bool, tuple[str, ...], tuple[str, ...]]:
    """(blocks, layers, whether a cluster is watched, the names of a user loop's extra scalars,
    a Ray run's stage actors) in `snapshot`: what fixes a file's columns."""
    run = snapshot.run
    if run is None:
        return 0, 0, snapshot.ray is not None, (), ()
    workers = tuple(worker_label(w) for w in run.workers)
    return len(run.blocks), len(run.layers), snapshot.ray is not None, tuple(run.user), workers


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


def _in_unit(value: float | None, unit: int) -> Any:
    if value is None or unit == 1:
        return value if isinstance(value, int) else _number(value)
    return round(value / unit, 1)


def _number(value: float | None) -> Any:
    # Six significant digits: enough to plot, short enough to read.
    return None if value is None else float(f"{value:.6g}")


def snapshot_to_row(
    snapshot: Snapshot,
    n_blocks: int,
    n_layers: int,
    cluster: bool = False,
    user: tuple[str, ...] = (),
    workers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The CSV row of a Snapshot (None = empty cell) for a file of this layout."""
    system, run, ray = snapshot.system, snapshot.run, snapshot.ray
    row: dict[str, Any] = dict.fromkeys(csv_columns(n_blocks, n_layers, cluster, user, workers))
    row.update(
        ts=round(snapshot.time, 3),
        interval_s=snapshot.interval,
        total_mib=_mib(system.total),
        used_mib=_mib(system.used),
        avail_mib=_mib(system.available),
        cpu_pct=system.cpu_percent,
        event=" | ".join(snapshot.events) or None,
    )
    if cluster and ray is not None and ray.reachable:
        row.update(
            ray_nodes_alive=ray.nodes_alive,
            ray_nodes_total=len(ray.nodes),
            ray_actors_alive=ray.actors_alive,
            ray_actors_total=len(ray.actors),
            ray_restarts=ray.restarts,
            ray_object_store_used_mib=_mib(ray.object_store_used),
            ray_cpu_pct=_number(ray.cpu_percent),
            ray_memory_used_mib=_mib(ray.memory_used),
        )
    if run is None:
        return row
    row.update(
        run_state=run.state,
        run_pid=run.pid,
        rss_mib=_mib(run.rss),
        run_cpu_pct=run.cpu_percent,
        step=run.step,
        tokens=run.tokens,
        tokens_per_s=_number(run.tokens_per_s),
        step_ms=_number(run.step_ms),
        loss_bpb=_number(run.loss_bpb),
        inner_lr=_number(run.inner_lr),
        conversation=run.conversation,
        sampled_step=run.sampled_step,
        baseline_bpb=_number(run.baseline_bpb),
        gain=_number(run.gain),
    )
    if run.mlx is not None:
        for name in ("active", "cache", "peak", "limit"):
            row[f"mlx_{name}_mib"] = _mib(getattr(run.mlx, name))
    for prefix, stats, fields, count in (
        ("block", run.blocks, BLOCK_FIELDS, n_blocks),
        ("layer", run.layers, LAYER_FIELDS, n_layers),
    ):
        for i, stat in enumerate(stats[:count]):
            for field in fields:
                row[f"{prefix}{i}_{field}"] = _number(getattr(stat, field))
    for name in user:  # a scalar first reported after the file opened has no column
        row[f"user_{name}"] = _number(run.user.get(name))
    for worker in run.workers:
        label = worker_label(worker)
        if label not in workers:  # an actor the file has no columns for
            continue
        for column, (name, unit) in WORKER_COLUMNS.items():
            value = getattr(worker, name)
            row[f"{label}_{column}"] = (
                value if unit == 1 or value is None else round(value / unit, 1)
            )
    return row


def _csv_line(values: list[Any]) -> str:
    """One row, on one line: a string's control characters (a run error's newlines) are written
    as escapes, so the last newline of a torn file always ends a whole row."""
    cells = ["" if v is None else printable(v) if isinstance(v, str) else v for v in values]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


# Every xltop header begins with these; the block and layer columns after them vary by run.
HEADER_START = _csv_line([*BASE_COLUMNS, ""]).rstrip("\n").encode()


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before a run starts, if `path` can never be a CSV log."""
    if not os.fspath(path):
        raise CsvLogError("cannot log to '': the path is empty")
    path = Path(path)
    if path.is_dir():
        raise CsvLogError(f"{path} is a directory, not a CSV file")
    folder = path.parent
    if not folder.is_dir():
        raise CsvLogError(f"cannot log to {path}: folder {folder} does not exist")
    if not path.exists():
        if not os.access(folder, os.W_OK):
            raise CsvLogError(f"cannot log to {path}: permission denied")
        return
    # The run's block and layer columns are not known yet: only the base columns are checked.
    os.close(_open_log(path, os.O_RDWR, HEADER_START))


def _open_log(path: Path, flags: int, header: bytes) -> int:
    """A descriptor on `path`, a regular file that is empty or begins with `header`.

    Anything else is refused untouched: a FIFO would block the open and a device would swallow
    the rows (O_NONBLOCK keeps a FIFO from blocking until it is refused); a file not begun by
    our header is not ours to append to. A file holding only part of our header (xltop killed
    while writing its first row) is refused too: that much does not prove the file is ours.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CsvLogError(f"cannot log to {path}: {exc.strerror}") from None
    try:
        if not S_ISREG(os.fstat(fd).st_mode):
            raise CsvLogError(f"cannot log to {path}: not a regular file")
        try:
            start = os.pread(fd, len(header) + (1 << 16), 0)
        except OSError as exc:  # a "regular" file that cannot be read back: /proc/self/mem
            raise CsvLogError(f"cannot log to {path}: {exc.strerror}") from None
        if start and not start.startswith(header):
            raise CsvLogError(_refusal(path, start, header))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(path: Path, start: bytes, header: bytes) -> str:
    if not start.startswith(HEADER_START):
        return (
            f"{path} is not an xltop CSV log (its first line is not xltop's header); "
            "refusing to touch it: log to a new file"
        )
    theirs, ours = (line.split(b"\n", 1)[0].count(b",") + 1 for line in (start, header))
    return (
        f"{path} already holds an xltop CSV with other columns ({theirs} vs {ours}); "
        "refusing to mix schemas: log to a new file"
    )


def _whole_rows_end(fd: int, header_size: int) -> int:
    """Where the last whole row (or the header) of the log at `fd` ends: after its last newline."""
    end = os.fstat(fd).st_size
    while end > header_size:
        start = max(end - (1 << 16), header_size)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return header_size


class CsvLog:
    def __init__(self, path: str | os.PathLike, columns_from: Snapshot):
        self.path = Path(path)
        self.layout = layout(columns_from)
        self.columns = csv_columns(*self.layout)
        header = _csv_line(self.columns).encode()
        check_writable(self.path)
        self._fd = _open_log(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, header)
        try:
            # The header goes out with the first row, so an empty file means nothing was logged.
            size = os.fstat(self._fd).st_size
            self._pending = header if size == 0 else b""
            # Ours (the header is exactly this run's): drop a torn last row a killed monitor left.
            self._end = 0 if size == 0 else _whole_rows_end(self._fd, len(header))
            if self._end < size:
                os.ftruncate(self._fd, self._end)
        except OSError as exc:
            self._abandon()
            raise CsvLogError(f"cannot log to {self.path}: {exc.strerror}") from None

    @classmethod
    def open(cls, path: str | os.PathLike, first_snapshot: Snapshot) -> CsvLog:
        return cls(path, columns_from=first_snapshot)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, snapshot: Snapshot) -> None:
        """Append one row; on a write error cut the file back to its last whole row, close it and
        raise CsvLogError."""
        row = snapshot_to_row(snapshot, *self.layout)
        line = self._pending + _csv_line([row[c] for c in self.columns]).encode()
        written = 0
        try:
            while written < len(line):  # a short write (the disk filled) is retried to learn why
                written += os.write(self._fd, line[written:])
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)
            self._abandon()
            raise CsvLogError(
                f"CSV logging to {self.path} stopped: {exc.strerror or exc}"
            ) from None
        self._end = os.lseek(self._fd, 0, os.SEEK_CUR)
        self._pending = b""

    def _abandon(self) -> None:
        fd, self._fd = self._fd, -1
        with contextlib.suppress(OSError):  # nothing is buffered: a failing close loses nothing
            os.close(fd)

    def close(self) -> None:
        if not self.closed:
            self._abandon()


class CsvSink:
    """The CSV-logging policy the headless modes and the TUI share: the file opens with the first
    Snapshot written after `start` (its run's layout fixes the columns); a log that cannot be
    opened or written stops, and `on_error` hears why once; monitoring goes on. Thread-safe: the
    TUI writes from its tick thread and starts or stops from its event loop."""

    def __init__(self, path: str | os.PathLike | None, on_error: Callable[[str], None]):
        self.path = path  # where the log goes (again) on `start`
        self.active = path is not None
        self._on_error = on_error
        self._log: CsvLog | None = None
        self._lock = threading.Lock()

    def start(self, path: str | os.PathLike | None = None) -> None:
        """Log to `path` (else the last path) from the next Snapshot on."""
        with self._lock:
            self.path = path or self.path
            self.active = self.path is not None

    def write(self, snapshot: Snapshot) -> None:
        with self._lock:
            if not self.active or self.path is None:
                return
            try:
                if self._log is None:
                    self._log = CsvLog.open(self.path, snapshot)
                self._log.write(snapshot)
                return
            except CsvLogError as exc:
                self.active, self._log = False, None
                message = f"{exc}; monitoring goes on"
        self._on_error(message)  # outside the lock: it may post to the monitor or the screen

    def stop(self) -> str | None:
        """Stop logging; the path of the file it closed, or None if none was open."""
        with self._lock:
            self.active = False
            log, self._log = self._log, None
        if log is None:
            return None
        log.close()
        return str(log.path)
