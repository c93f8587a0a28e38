"""Plain-text renderings of a Snapshot: the `--once` table and the headless status line."""

from __future__ import annotations

import time
from dataclasses import fields

from ttt_runtime.protocol import BlockTiming, LayerFigures
from xltop.snapshot import SHORT_ID, ClusterState, RunInfo, RunState, Snapshot
from xltop.units import MIB, printable, size

COMMAND_WIDTH = 60
# the per-block table: a column per field of each, block times in ms, layer figures in general
BLOCK_COLUMNS = [(f.name, ".2f") for f in fields(BlockTiming)]
LAYER_COLUMNS = [(f.name, ".3g") for f in fields(LayerFigures)]


def _num(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _aligned(headers: list[str], rows: list[list[str]], text: tuple[int, ...] = ()) -> list[str]:
    """Numbers right-aligned, `text` columns left-aligned; the last column may run long."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]

    def cell(i: int, value: str) -> str:
        return value.ljust(widths[i]) if i in text else value.rjust(widths[i])

    return [
        "  ".join([*(cell(i, c) for i, c in enumerate(r[:-1])), r[-1]]).rstrip()
        for r in [headers, *rows]
    ]


def _run_lines(run: RunInfo) -> list[str]:
    lines = [
        f"Run: {run.state}  pid {run.pid or '-'}  mode {run.mode or '-'}  "
        f"preset {run.preset or '-'}  step {run.step}  tokens {run.tokens}  "
        f"{_num(run.tokens_per_s, '.0f')} tok/s  step {_num(run.step_ms, '.1f')} ms  "
        f"loss {_num(run.loss_bpb, '.3f')} bpb"
    ]
    memory = f"     RSS {size(run.rss)}  CPU {_num(run.cpu_percent, '.1f')}%"
    if run.mlx is not None:
        memory += (
            f"  MLX active {size(run.mlx.active)}  cache {size(run.mlx.cache)}  "
            f"peak {size(run.mlx.peak)}  limit {size(run.mlx.limit)}  "
            f"({run.mlx.backend} {run.mlx.device}, BLAS {run.blas or '-'})"
        )
    lines.append(memory)
    if run.state == RunState.DEAD and run.last_error:
        lines.append(f"     last error: {run.last_error}")
    if run.blocks or run.layers:
        rows = []
        for i in range(max(len(run.blocks), len(run.layers))):
            row = [str(i)]
            for stats, columns in ((run.blocks, BLOCK_COLUMNS), (run.layers, LAYER_COLUMNS)):
                stat = stats[i] if i < len(stats) else None  # '-' cells
                row += [_num(getattr(stat, name, None), spec) for name, spec in columns]
            rows.append(row)
        headers = ["BLOCK", *(name.upper() for name, _ in BLOCK_COLUMNS + LAYER_COLUMNS)]
        lines += ["", f"per block (sampled step {_num(run.sampled_step, 'd')}):"]
        lines += _aligned(headers, rows)
    return lines


def cluster_line(ray: ClusterState, sep: str = "  ") -> str:
    """The watched cluster summed up in one line, or why nothing can be read from it."""
    if ray.error is not None:
        return ray.error
    if not ray.reachable:
        return f"ray {ray.address}: no answer yet"
    figures = (
        f"ray {ray.address}",
        f"nodes {ray.nodes_alive}/{len(ray.nodes)}",
        f"actors {ray.actors_alive}/{len(ray.actors)}",
        f"restarts {ray.restarts}",
        f"CPU {_num(ray.cpu_percent, '.0f')}%",
        f"memory {size(ray.memory_used)}/{size(ray.memory_total)}",
        f"object store {size(ray.object_store_used)}/{size(ray.object_store_total)}",
    )
    return sep.join(figures)


def _cluster_lines(ray: ClusterState) -> list[str]:
    lines = [cluster_line(ray)]
    if ray.nodes:
        rows = [
            [
                n.label,
                n.ip,
                "alive" if n.alive else "dead",
                _num(n.cpu_percent, ".0f"),
                f"{n.cpus:g}",
                f"{size(n.memory_used)}/{size(n.memory_total)}",
                f"{size(n.object_store_used)}/{size(n.object_store_total)}",
                f"{n.gpus:g}",
                n.state_message or "",
            ]
            for n in ray.nodes
        ]
        headers = ["NODE", "IP", "STATE", "CPU%", "CORES", "MEMORY", "OBJECT_STORE", "GPUS", "WHY"]
        lines += ["", *_aligned(headers, rows, text=(0, 1, 2, 5, 6))]
    if ray.actors:
        rows = [
            [
                a.label,
                a.state,
                str(a.pid or "-"),
                (a.node_id or "-")[:SHORT_ID],
                size(a.rss),
                _num(a.cpu_percent, ".1f"),
                str(a.num_restarts),
                a.death_cause or "",
            ]
            for a in ray.actors
        ]
        headers = ["ACTOR", "STATE", "PID", "NODE", "RSS", "CPU%", "RESTARTS", "DEATH_CAUSE"]
        lines += ["", *_aligned(headers, rows, text=(0, 1, 3))]
    return lines


def format_snapshot(snapshot: Snapshot) -> str:
    """The whole Snapshot as a text table, for `xltop --once` (like `top -b -n 1`)."""
    system = snapshot.system
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.time))
    lines = [
        f"xltop {clock}  interval {snapshot.interval:g} s",
        f"Mem: {size(system.total)} total  {size(system.used)} used  "
        f"{size(system.available)} available  CPU {system.cpu_percent:.1f}%",
    ]
    lines += _run_lines(snapshot.run) if snapshot.run else ["Run: none"]
    if snapshot.ray is not None:
        lines += ["", *_cluster_lines(snapshot.ray)]
    lines += [f"event: {e}" for e in snapshot.events]
    rows = [
        [
            f"{p.pid}{'*' if p.is_run else ''}",
            p.user[:10],
            f"{p.rss / MIB:.1f}",
            f"{p.cpu_percent:.1f}",
            p.name[:16],
            p.command[:COMMAND_WIDTH],
        ]
        for p in snapshot.processes
    ]
    headers = ["PID", "USER", "RSS_MIB", "CPU%", "NAME", "COMMAND"]
    lines += ["", *_aligned(headers, rows, text=(1, 4))]
    # Commands, names and errors come from elsewhere: shown, never obeyed by the terminal.
    return "\n".join(map(printable, lines)) + "\n"


def status_line(snapshot: Snapshot) -> str:
    """One short line per tick for headless mode's stderr."""
    system = snapshot.system
    parts = [
        time.strftime("%H:%M:%S", time.localtime(snapshot.time)),
        f"mem {size(system.used)}/{size(system.total)}",
        f"cpu {system.cpu_percent:.0f}%",
    ]
    run = snapshot.run
    if run is not None:
        parts.append(f"run {run.state}")
        if run.state != RunState.DEAD:
            parts += [
                f"step {run.step}",
                f"{_num(run.tokens_per_s, '.0f')} tok/s",
                f"loss {_num(run.loss_bpb, '.3f')}",
                f"rss {size(run.rss)}",
            ]
            if run.mlx is not None:
                parts.append(f"mlx {size(run.mlx.active)}")
    ray = snapshot.ray
    if ray is not None and ray.reachable:
        parts.append(f"ray {ray.nodes_alive}/{len(ray.nodes)} nodes")
        parts.append(f"{ray.actors_alive}/{len(ray.actors)} actors")
    elif ray is not None:
        parts.append("ray unreachable")
    return printable("  ".join(parts))
