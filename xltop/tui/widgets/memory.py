"""Memory panel: the run's RSS, MLX active/cache/peak against the run's real ceiling, system.

The MLX ceiling is the one the run reports (Metal's recommended working set on Apple silicon,
the machine's memory elsewhere), never total RAM posing as GPU memory. Numbers sit beside every
bar so the panel reads the same without colour. The bars are drawn straight to Textual strips
through the public line API, as the charts are: a Static rebuilt from Rich Text each tick cost
~3.7 ms of paint, the largest single widget cost of a tick.
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.strip import Strip
from textual.widget import Widget

from xltop import units
from xltop.snapshot import Snapshot

LABEL_WIDTH = 11
DIM = Style(dim=True)
FILL = {colour: Style(color=colour) for colour in ("green", "yellow", "red")}


def _bar_style(fraction: float) -> Style:
    return FILL["red" if fraction >= 0.9 else "yellow" if fraction >= 0.7 else "green"]


def bar(label: str, fraction: float, figures: str, width: int) -> Strip:
    """`label [|||||.....] figures` in `width` cells."""
    fraction = min(1.0, max(0.0, fraction))
    cells = max(4, width - LABEL_WIDTH - len(figures) - 3)
    filled = round(fraction * cells)
    return Strip(
        [
            Segment(label.ljust(LABEL_WIDTH)[:LABEL_WIDTH] + "["),
            Segment("|" * filled, _bar_style(fraction)),
            Segment("." * (cells - filled), DIM),
            Segment("] " + figures),
        ]
    )


def size_bar(label: str, used: int | None, limit: int | None, width: int) -> Strip:
    fraction = used / limit if used and limit else 0.0
    return bar(label, fraction, f"{units.size(used)} / {units.size(limit)}", width)


def draw(snapshot: Snapshot, width: int) -> list[Strip]:
    """The panel's lines for `snapshot` in `width` cells."""
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
        lines.append(Strip([Segment(f"MLX ceiling {units.size(ceiling)}{where}", DIM)]))
    return [line.crop(0, width) for line in lines]


class MemoryPanel(Widget):
    """The bars of the last Snapshot shown, rebuilt once per Snapshot or resize; as tall as
    its lines."""

    DEFAULT_CSS = "MemoryPanel { height: auto; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.snapshot: Snapshot | None = None
        self.version = 0  # bumped by `show`: the figures changed
        self._strips: list[Strip] = []
        self._built_for: tuple | None = None

    def show(self, snapshot: Snapshot) -> None:
        rows = len(self.lines())
        self.snapshot = snapshot
        self.version += 1
        self.refresh(layout=len(self.lines()) != rows)  # re-layout only for a line more or less

    def lines(self) -> list[Strip]:
        key = (self.version, self.size)
        if key != self._built_for:
            width = max(30, self.size.width or 40)
            lines = draw(self.snapshot, width) if self.snapshot is not None else []
            # Under the widget's own colours, as a Static's text is.
            self._strips = [line.apply_style(self.rich_style) for line in lines]
            self._built_for = key
        return self._strips

    @property
    def text(self) -> str:
        """What the panel shows, as plain text (one line a bar)."""
        return "\n".join(strip.text for strip in self.lines())

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self.lines())

    def render_line(self, y: int) -> Strip:
        lines = self.lines()
        return lines[y] if y < len(lines) else Strip.blank(self.size.width, self.rich_style)
