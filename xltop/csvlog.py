"""The CSV sink: one schema, one row per Snapshot, every column named with its unit.

The block and layer columns are fixed for the file by the first Snapshot (one column per block
and per layer). Each row goes out in one write and is flushed, so a killed monitor loses at
most the row it was writing and the file still parses.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import Any

from xltop.snapshot import Snapshot

MIB = 1024 * 1024
BASE_COLUMNS = (
    "ts", "interval_s",
    "total_mib", "used_mib", "avail_mib", "cpu_pct",
    "run_state", "run_pid", "rss_mib", "run_cpu_pct",
    "step", "tokens", "tokens_per_s", "step_ms", "loss_bpb", "inner_lr", "conversation",
    "sampled_step",
    "mlx_active_mib", "mlx_cache_mib", "mlx_peak_mib", "mlx_limit_mib",
)  # fmt: skip
BLOCK_FIELDS = ("fwd_ms", "bwd_ms")
LAYER_FIELDS = (
    "w_norm", "update_norm", "drift", "inner_loss_before", "inner_loss_after", "exact_drift",
)  # fmt: skip


class CsvLogError(Exception):
    """A CSV log that cannot be opened or written; the message names the path and the cause."""


def csv_columns(n_blocks: int, n_layers: int) -> list[str]:
    blocks = [f"block{i}_{f}" for i in range(n_blocks) for f in BLOCK_FIELDS]
    layers = [f"layer{i}_{f}" for i in range(n_layers) for f in LAYER_FIELDS]
    return [*BASE_COLUMNS, *blocks, *layers, "event"]


def layout(snapshot: Snapshot) -> tuple[int, int]:
    """(blocks, layers) of the run in `snapshot`: what fixes a file's columns."""
    run = snapshot.run
    return (len(run.blocks), len(run.layers)) if run else (0, 0)


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


def _number(value: float | None) -> Any:
    # Six significant digits: enough to plot, short enough to read.
    return None if value is None else float(f"{value:.6g}")


def snapshot_to_row(snapshot: Snapshot, n_blocks: int, n_layers: int) -> dict[str, Any]:
    """The CSV row of a Snapshot (None = empty cell) for a file with this many blocks/layers."""
    system, run = snapshot.system, snapshot.run
    row: dict[str, Any] = dict.fromkeys(csv_columns(n_blocks, n_layers))
    row.update(
        ts=round(snapshot.time, 3),
        interval_s=snapshot.interval,
        total_mib=_mib(system.total),
        used_mib=_mib(system.used),
        avail_mib=_mib(system.available),
        cpu_pct=system.cpu_percent,
        event=" | ".join(snapshot.events) or None,
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
    return row


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before a run starts, if `path` can never be a CSV log."""
    path = Path(path)
    if path.is_dir():
        raise CsvLogError(f"{path} is a directory, not a CSV file")
    folder = path.parent
    if not folder.is_dir():
        raise CsvLogError(f"cannot log to {path}: folder {folder} does not exist")
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK):
        raise CsvLogError(f"cannot log to {path}: permission denied")


class CsvLog:
    def __init__(self, path: str | os.PathLike, columns_from: Snapshot):
        self.path = Path(path)
        self.n_blocks, self.n_layers = layout(columns_from)
        self.columns = csv_columns(self.n_blocks, self.n_layers)
        header = _csv_line(self.columns)
        check_writable(self.path)
        try:
            existing = self._existing_header()
            if existing is not None and existing != header.rstrip("\n"):
                raise CsvLogError(
                    f"{self.path} already holds a CSV with other columns "
                    f"({existing.count(',') + 1} vs {len(self.columns)}); refusing to mix "
                    "schemas: log to a new file"
                )
            self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise CsvLogError(f"cannot log to {self.path}: {exc.strerror}") from None
        # The header goes out with the first row, so an empty file means nothing was logged.
        self._pending = "" if existing is not None else header

    @classmethod
    def open(cls, path: str | os.PathLike, first_snapshot: Snapshot) -> CsvLog:
        return cls(path, columns_from=first_snapshot)

    def _existing_header(self) -> str | None:
        """The header of a non-empty file we append to, after dropping a torn last row."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        with open(self.path, "r+b") as f:
            data = f.read()
            if not data.endswith(b"\n"):  # a monitor killed mid-row left half a line: drop it
                data = data[: data.rfind(b"\n") + 1]
                f.truncate(len(data))
        if not data:
            return None
        return data[: data.find(b"\n")].decode("utf-8", errors="replace").rstrip("\r")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, snapshot: Snapshot) -> None:
        """Append one row and flush; on a write error close the file and raise CsvLogError."""
        row = snapshot_to_row(snapshot, self.n_blocks, self.n_layers)
        line = self._pending + _csv_line([row[c] for c in self.columns])
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            self._abandon()
            raise CsvLogError(
                f"CSV logging to {self.path} stopped: {exc.strerror or exc}"
            ) from None
        self._pending = ""

    def _abandon(self) -> None:
        # A failed flush is retried by close() and fails again: there is nothing left to save.
        with contextlib.suppress(OSError):
            self._file.close()

    def close(self) -> None:
        if not self._file.closed:
            self._abandon()
