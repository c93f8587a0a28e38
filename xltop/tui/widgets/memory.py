"""Memory panel: the run's RSS, MLX active/cache/peak against the run's real ceiling, system.

The MLX ceiling is the one the run reports (Metal's recommended working set on Apple silicon,
the machine's memory elsewhere), never total RAM posing as GPU memory. Numbers sit beside every
bar so the panel reads the same without colour.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from xltop import units
from xltop.snapshot import Snapshot

LABEL_WIDTH = 11


def _bar_style(fraction: float) -> str:
    return "red" if fraction >= 0.9 else "yellow" if fraction >= 0.7 else "green"


def bar(label: str, fraction: float, figures: str, width: int) -> Text:
    """`label [|||||.....] figures` in `width` cells."""
    fraction = min(1.0, max(0.0, fraction))
    cells = max(4, width - LABEL_WIDTH - len(figures) - 3)
    filled = round(fraction * cells)
    line = Text(label.ljust(LABEL_WIDTH)[:LABEL_WIDTH])
    line.append("[")
    line.append("|" * filled, style=_bar_style(fraction))
    line.append("." * (cells - filled), style="dim")
    line.append("] " + figures)
    return line


def size_bar(label: str, used: int | None, limit: int | None, width: int) -> Text:
    fraction = used / limit if used and limit else 0.0
    return bar(label, fraction, f"{units.size(used)} / {units.size(limit)}", width)


class MemoryPanel(Static):
    def show(self, snapshot: Snapshot) -> None:
        width = max(30, self.size.width or 40)
        system, run = snapshot.system, snapshot.run
        mlx = run.mlx if run is not None else None
        ceiling = mlx.limit if mlx is not None and mlx.limit else system.total
        run_cpu = f" run {run.cpu_percent:.0f}%" if run and run.cpu_percent is not None else ""
        lines = [
            size_bar("run RSS", run.rss if run else None, system.total, width),
            size_bar("MLX active", mlx.active if mlx else None, ceiling, width),
            size_bar("MLX cache", mlx.cache if mlx else None, ceiling, width),
            size_bar("MLX peak", mlx.peak if mlx else None, ceiling, width),
            size_bar("system", system.used, system.total, width),
            bar("CPU", system.cpu_percent / 100, f"{system.cpu_percent:.0f}%{run_cpu}", width),
        ]
        if mlx is not None:
            device = "" if mlx.device in ("", mlx.backend) else f" {mlx.device}"
            where = f" ({mlx.backend}{device})" if mlx.backend else ""  # a replay's CSV has none
            lines.append(Text(f"MLX ceiling {units.size(ceiling)}{where}", style="dim"))
        self.update(Text("\n").join(lines), layout=False)  # fixed size: no re-layout
