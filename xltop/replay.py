"""`xltop --replay FILE`: a CSV log that xltop wrote, read back into Snapshots and played.

Reading is the CSV sink's inverse (xltop.csvlog.snapshot_to_row): each row becomes the Snapshot
that wrote it, so the TUI shows a replay through the same pipeline as a live run. What a CSV does
not hold stays empty: the processes table, the run's mode, preset and MLX device, the Ray
cluster (whose columns are totals only). A file from another xltop version, or torn by a killed
monitor, replays what it can: columns this version does not know are ignored, columns it misses
are unknown, rows that do not parse are skipped, and `Recording.skipped` says what was left out.
A file that is not an xltop CSV at all is refused (ReplayError), naming what it lacks.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ttt_runtime.files import read_bounded
from ttt_runtime.protocol import BlockTiming, LayerFigures, WorkerFigures
from xltop import units
from xltop.csvlog import BASE_COLUMNS, BLOCK_FIELDS, CLUSTER_COLUMNS, LAYER_FIELDS, WORKER_COLUMNS
from xltop.monitor import MAX_INTERVAL_S
from xltop.snapshot import MlxMemory, RunInfo, RunState, Snapshot, SystemInfo

# Without these a row is no tick of a machine: a file lacking any of them is not an xltop log.
REQUIRED_COLUMNS = ("ts", "interval_s", "total_mib", "used_mib", "avail_mib", "cpu_pct")
# The times and intervals xltop can have logged: the clock shows the one (up to year 9999), the
# replay waits out the other.
TS_RANGE = (0.0, 253402300799.0)
INTERVAL_RANGE = (0.0, MAX_INTERVAL_S)
# Every row is held in memory as a Snapshot: a day of 1 s ticks of a 24-block run is ~150 MiB.
MAX_BYTES = 512 * 1024 * 1024
SPEEDS = (1, 10, 100)  # the replay speeds `x` cycles through
LISTED_LINES = 5  # skipped rows named by line number in the message; the rest are counted
USER_PREFIX = "user_"  # xltop.csvlog's column of a user loop's scalar: user_<name>
_T = TypeVar("_T")
_PER_BLOCK = re.compile(r"(block|layer)(\d+)_(\w+)")
_PER_WORKER = re.compile(r"stage(\d+)r(\d+)_(\w+)")  # xltop.csvlog.worker_label's columns


class ReplayError(Exception):
    """A file that cannot be replayed at all; the message names the file and why."""


@dataclass(frozen=True)
class Recording:
    path: str
    snapshots: tuple[Snapshot, ...]
    skipped: tuple[str, ...] = ()  # one sentence per kind of thing left out


def _read_text(path: str) -> str:
    """The file's text; only a regular file is read (a FIFO would block, a device never end)."""
    try:
        data = read_bounded(path, MAX_BYTES)
    except OSError as exc:  # NotARegularFile among them
        raise ReplayError(f"cannot replay {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ReplayError(f"cannot replay {path}: over {MAX_BYTES // units.MIB} MiB")
    # utf-8-sig: a log saved again by a spreadsheet ("CSV UTF-8") begins with a byte order mark
    return data.decode("utf-8-sig", errors="replace")


class _Row:
    """One row's cells by column name; a cell that does not parse is a ValueError naming it.
    A column the file lacks reads as an empty cell (unknown)."""

    def __init__(self, cells: dict[str, str]):
        self.cells = cells

    def text(self, column: str) -> str:
        return self.cells.get(column, "")

    def _parse(self, column: str, kind: Callable[[str], _T]) -> _T | None:
        """NaN and infinities are refused too: xltop writes none (the runtime's protocol drops
        them), and a size or a time made of one does not convert."""
        cell = self.text(column)
        if not cell:
            return None
        value: _T | None
        try:
            value = kind(cell)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{column} is {cell[:40]!r}")
        return value

    def number(self, column: str) -> float | None:
        return self._parse(column, float)

    def integer(self, column: str) -> int | None:
        return self._parse(column, int)

    def mib_bytes(self, column: str) -> int | None:
        """A MiB cell as bytes (the CSV keeps one decimal: writing it back gives the same cell)."""
        return self.scaled(column, units.MIB)

    def scaled(self, column: str, unit: int) -> int | None:
        """A cell of a count written in `unit`s (MiB, KiB), as the count."""
        value = self.number(column)
        return None if value is None else round(value * unit)

    def as_written(self, column: str) -> float | None:
        """A cell of xltop.csvlog's _in_unit with no unit: an integer stays one."""
        return self._parse(
            column, lambda cell: int(cell) if cell.lstrip("-").isdigit() else float(cell)
        )

    def required(self, column: str, within: tuple[float, float] = (-math.inf, math.inf)) -> float:
        value = self.number(column)
        if value is None:
            raise ValueError(f"{column} is empty")
        if not within[0] <= value <= within[1]:
            raise ValueError(f"{column} is {self.text(column)[:40]!r}, out of range")
        return value


class _Layout:
    """What a file's header holds: its block and layer counts, and what this version reads."""

    def __init__(self, path: str, header: list[str]):
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ReplayError(
                f"{path} is not an xltop CSV log (its header lacks {', '.join(missing)})"
            )
        self.columns = header
        counts = {"block": 0, "layer": 0}
        self.user: list[str] = []  # a user loop's extra scalars (ttt_runtime.report)
        self.workers: list[tuple[int, int]] = []  # a Ray run's stage actors: (stage, replica)
        unknown = []
        known = {*BASE_COLUMNS, *CLUSTER_COLUMNS, "event"}
        fields = {"block": BLOCK_FIELDS, "layer": LAYER_FIELDS}
        for column in header:
            match = _PER_BLOCK.fullmatch(column)
            if match and match[3] in fields[match[1]]:
                counts[match[1]] = max(counts[match[1]], int(match[2]) + 1)
            elif (worker := _PER_WORKER.fullmatch(column)) and worker[3] in WORKER_COLUMNS:
                if (key := (int(worker[1]), int(worker[2]))) not in self.workers:
                    self.workers.append(key)
            elif column.startswith(USER_PREFIX) and column != USER_PREFIX:
                self.user.append(column.removeprefix(USER_PREFIX))
            elif column not in known:
                unknown.append(column)
        self.n_blocks, self.n_layers = counts["block"], counts["layer"]
        self.notes = []
        if unknown:
            self.notes.append(f"ignored {len(unknown)} columns it does not know: {_few(unknown)}")
        absent = [c for c in (*BASE_COLUMNS, "event") if c not in header]
        if absent:
            self.notes.append(f"columns absent from the file, shown unknown: {_few(absent)}")
        if any(c in header for c in CLUSTER_COLUMNS):
            self.notes.append("the Ray cluster's columns (totals only) are not replayed")

    def snapshot(self, cells: list[str]) -> Snapshot:
        """The Snapshot of one row; ValueError saying which cell does not parse."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells where the header has {len(self.columns)}")
        row = _Row(dict(zip(self.columns, cells, strict=True)))
        total, used, available = (
            round(row.required(c) * units.MIB) for c in ("total_mib", "used_mib", "avail_mib")
        )
        event = row.text("event")
        return Snapshot(
            time=row.required("ts", TS_RANGE),
            interval=row.required("interval_s", INTERVAL_RANGE),
            system=SystemInfo(total, used, available, cpu_percent=row.required("cpu_pct")),
            run=self._run(row),
            events=tuple(event.split(" | ")) if event else (),
        )

    def _run(self, row: _Row) -> RunInfo | None:
        state = row.text("run_state")
        if not state:  # a log of --no-run
            return None
        if state not in RunState._value2member_map_:
            raise ValueError(f"run_state is {state[:40]!r}")
        active, cache, peak, limit = (
            row.mib_bytes(f"mlx_{name}_mib") for name in ("active", "cache", "peak", "limit")
        )
        return RunInfo(
            state=RunState(state),
            pid=row.integer("run_pid"),
            rss=row.mib_bytes("rss_mib"),
            cpu_percent=row.number("run_cpu_pct"),
            step=row.integer("step") or 0,
            tokens=row.integer("tokens") or 0,
            tokens_per_s=row.number("tokens_per_s"),
            step_ms=row.number("step_ms"),
            loss_bpb=row.number("loss_bpb"),
            inner_lr=row.number("inner_lr"),
            conversation=row.integer("conversation") or 0,
            sampled_step=row.integer("sampled_step"),
            baseline_bpb=row.number("baseline_bpb"),
            gain=row.number("gain"),
            blocks=tuple(
                BlockTiming(*(row.number(f"block{i}_{f}") for f in BLOCK_FIELDS))
                for i in range(self.n_blocks)
            ),
            layers=tuple(
                LayerFigures(*(row.number(f"layer{i}_{f}") for f in LAYER_FIELDS))
                for i in range(self.n_layers)
            ),
            user={name: row.number(USER_PREFIX + name) for name in self.user},
            workers=tuple(
                worker
                for stage, replica in self.workers
                if (worker := _worker(row, stage, replica)) is not None
            ),
            # The CSV keeps no backend or device: the header leaves them out.
            mlx=None
            if active is None
            else MlxMemory(active, cache or 0, peak or 0, limit or 0, backend="", device=""),
        )


def _worker(row: _Row, stage: int, replica: int) -> WorkerFigures | None:
    """A Ray stage actor's figures, None in a row where it has none. The CSV keeps neither its
    blocks, node nor MLX cache."""
    label = f"stage{stage}r{replica}_"
    if not row.text(label + "pid"):
        return None
    figures: dict[str, Any] = {
        name: row.as_written(label + column) if unit == 1 else row.scaled(label + column, unit)
        for column, (name, unit) in WORKER_COLUMNS.items()
    }
    return WorkerFigures(stage, replica, blocks=(), node_id="", node_ip="", cache=0, **figures)


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED_LINES])
    return shown if len(items) <= LISTED_LINES else f"{shown} and {len(items) - LISTED_LINES} more"


def load(path: str) -> Recording:
    """Read an xltop CSV log; ReplayError if it is not one or holds no whole row."""
    lines = _read_text(path).split("\n")
    torn = lines.pop()  # after the last newline: '' unless the last row was cut mid-write
    header = lines[0] if lines else torn  # a header cut before its newline is still read
    if not header:
        raise ReplayError(f"{path} is not an xltop CSV log (it holds no header line)")
    layout = _Layout(path, next(csv.reader([header])))
    snapshots, bad = [], []
    for number, cells in enumerate(csv.reader(lines[1:]), start=2):
        try:
            snapshots.append(layout.snapshot(cells))
        except ValueError as exc:
            bad.append(f"line {number} ({exc})")
    skipped = list(layout.notes)
    if bad:
        skipped.append(f"skipped {len(bad)} rows that do not parse: {_few(bad)}")
    if torn:
        skipped.append(f"skipped the torn last line (line {len(lines) + 1}, cut mid-row)")
    if not snapshots:
        raise ReplayError(f"{path} holds no whole row to replay")
    return Recording(path, tuple(snapshots), tuple(skipped))


# -- the summary of --replay FILE --once ------------------------------------------------------


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _range(label: str, values: list[int | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return f"{label}: -"
    return f"{label}: min {units.size(min(known))}, max {units.size(max(known))}"


def summary(recording: Recording) -> list[str]:
    """The lines `--replay FILE --once` prints: duration, steps, mean tok/s, memory, loss."""
    shots = recording.snapshots
    first, last = shots[0], shots[-1]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.time))
    lines = [
        f"replay of {units.printable(recording.path)}: {len(shots)} ticks from {when}, "
        f"duration {_duration(last.time - first.time)}",
        _range("system memory used", [s.system.used for s in shots]),
    ]
    runs = [s.run for s in shots if s.run is not None]
    if not runs:
        return [*lines, "no run in this log (xltop --no-run)"]
    rates = [r.tokens_per_s for r in runs if r.tokens_per_s is not None]
    mean_rate = f"{sum(rates) / len(rates):.1f}" if rates else "-"
    final = next((r for r in reversed(runs) if r.loss_bpb is not None), None)
    return [
        *lines,
        f"steps: {runs[0].step} to {runs[-1].step} ({runs[-1].step - runs[0].step} steps)",
        f"mean tok/s: {mean_rate} (over the {len(rates)} ticks that logged it)",
        _range("run RSS", [r.rss for r in runs]),
        _range("MLX active", [r.mlx.active if r.mlx else None for r in runs]),
        _range("MLX peak", [r.mlx.peak if r.mlx else None for r in runs]),
        f"final loss: {units.number(final.loss_bpb, 4)} bpb at step {final.step}"
        if final
        else "final loss: -",
    ]


# -- playing it in the TUI ----------------------------------------------------------------------


@dataclass
class _Position:
    next: int = 0  # index of the next Snapshot to show
    playing: bool = True
    speed: int = SPEEDS[0]
    shown_at: float = field(default_factory=time.monotonic)  # when the last one went on screen
    step_requested: bool = False
    closed: bool = False


class ReplayPlayer:
    """Stands in for the Monitor in the TUI: `tick()` hands out the recording's Snapshots at the
    pace they were logged (each after its own interval), sped up or paused by the keys. There is
    no run to command (`runtime` is None)."""

    runtime = None

    def __init__(self, recording: Recording):
        self.recording = recording
        self.name = Path(recording.path).name
        self._position = _Position()
        self._changed = threading.Condition()
        self._events: list[str] = [f"replaying {units.printable(recording.path)}"]
        self._events += [f"replay: {note}" for note in recording.skipped]

    @property
    def interval(self) -> float:
        """Seconds the next tick stays on screen at this speed."""
        return self._gap() / self._position.speed

    def _gap(self) -> float:
        shots, position = self.recording.snapshots, self._position
        return shots[min(position.next, len(shots) - 1)].interval if position.next else 0.0

    def post_event(self, text: str) -> None:
        with self._changed:
            self._events.append(text)

    @property
    def status(self) -> str:
        """Where the replay stands, for the header: "12/300 10x" or "12/300 paused"."""
        position = self._position
        total = len(self.recording.snapshots)
        pace = f"{position.speed}x" if position.playing else "paused"
        return f"{position.next}/{total} {'end' if position.next == total else pace}"

    def tick(self) -> Snapshot:
        """Wait until the next Snapshot is due (or a step is asked for) and return it; at the
        end, wait until closed and return the last one again."""
        shots, position = self.recording.snapshots, self._position
        with self._changed:
            while not position.closed:
                at_end = position.next >= len(shots)
                if not at_end and position.step_requested:
                    break
                wait = None if at_end or not position.playing else self._due_in()
                if wait is not None and wait <= 0:
                    break
                self._changed.wait(wait)
            if position.closed:
                return shots[max(position.next - 1, 0)]
            snapshot = shots[position.next]
            position.next += 1
            position.step_requested = False
            position.shown_at = time.monotonic()
            if position.next == len(shots):
                position.playing = False
                self._events.append(f"end of the replay: {len(shots)} ticks")
            events, self._events = tuple(self._events), []
        return dataclasses.replace(snapshot, events=snapshot.events + events)

    def _due_in(self) -> float:
        return self._position.shown_at + self.interval - time.monotonic()

    def _change(self, change: Callable[[_Position], str]) -> str:
        with self._changed:
            sentence = change(self._position)
            self._changed.notify_all()
        return sentence

    def toggle_play(self) -> str:
        def toggle(position: _Position) -> str:
            if position.next >= len(self.recording.snapshots):
                return "the replay is at its end"
            position.playing = not position.playing
            return f"replay playing at {position.speed}x" if position.playing else "replay paused"

        return self._change(toggle)

    def step(self) -> str:
        """Show the next tick now, and pause."""

        def step(position: _Position) -> str:
            if position.next >= len(self.recording.snapshots):
                return "the replay is at its end"
            position.playing, position.step_requested = False, True
            return f"replay stepped to tick {position.next + 1} (paused)"

        return self._change(step)

    def next_speed(self) -> str:
        def faster(position: _Position) -> str:
            position.speed = SPEEDS[(SPEEDS.index(position.speed) + 1) % len(SPEEDS)]
            return f"replay speed {position.speed}x"

        return self._change(faster)

    def close(self, on_wait: Callable[[str], None] | None = None) -> None:
        """Wake a waiting tick; nothing else runs."""

        def close(position: _Position) -> str:
            position.closed = True
            return "replay closed"

        self._change(close)
