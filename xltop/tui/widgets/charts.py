"""Charts over a sliding window: memory (RSS, MLX active, MLX cache), tokens/s, losses.

History is recorded on every Snapshot, drawn only when the display is not frozen; the x axis is
seconds before the newest Snapshot. Drawing was most of a tick's paint, so a chart gets at most one
point per column, and goes from plotext's character matrix to Textual strips directly: plotext's
own path writes an ANSI string that Rich parses straight back into styles, twice the work.
"""

from __future__ import annotations

import functools
import math
from collections import deque

from plotext._utility import colors_to_ansi
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.strip import Strip
from textual_plotext import PlotextPlot

from xltop.snapshot import Snapshot
from xltop.units import MIB

WINDOW = 120  # ticks kept per series

# chart id -> title and its series: (label, function of a Snapshot -> value or None). The inner
# loss has its own scale (right axis): on the outer loss's axis one of the two would be flat.
RIGHT_AXIS = {"inner mean"}
SERIES = {
    "memory": (
        "memory MiB",
        (
            ("RSS", lambda s: s.run.rss / MIB if s.run and s.run.rss else None),
            ("MLX active", lambda s: s.run.mlx.active / MIB if s.run and s.run.mlx else None),
            ("MLX cache", lambda s: s.run.mlx.cache / MIB if s.run and s.run.mlx else None),
        ),
    ),
    "speed": (
        "tokens/s",
        (("tok/s", lambda s: s.run.tokens_per_s if s.run else None),),
    ),
    "loss": (
        "loss",
        (
            ("outer bpb", lambda s: s.run.loss_bpb if s.run else None),
            ("inner mean", lambda s: _mean_inner_loss(s)),
        ),
    ),
}


def _mean_inner_loss(snapshot: Snapshot) -> float | None:
    run = snapshot.run
    values = [x.inner_loss_after for x in (run.layers if run else ()) if x.inner_loss_after]
    return sum(values) / len(values) if values else None


@functools.cache
def _style(foreground, style, background) -> Style:
    """A plotext cell's colours as a Rich style, read from the ANSI code plotext would write."""
    text = Text.from_ansi(colors_to_ansi(foreground, style, background) + " ")
    ansi_style = text.spans[0].style if text.spans else None  # a Style: from_ansi parsed it
    return ansi_style if isinstance(ansi_style, Style) else Style.null()


class Chart(PlotextPlot):
    """A PlotextPlot drawn through Textual's line API, built once per data change or resize."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.version = 0  # bumped by `redraw`: the data changed
        self._strips: list[Strip] = []
        self._built_for: tuple | None = None

    def redraw(self) -> None:
        self.version += 1
        self.refresh()

    def render_line(self, y: int) -> Strip:
        key = (self.version, self.size, self.app.theme)
        if key != self._built_for:
            self._strips, self._built_for = self._build(), key
        return self._strips[y] if y < len(self._strips) else Strip.blank(self.size.width)

    def _build(self) -> list[Strip]:
        width, height = self.size
        if not width or not height:
            return []
        plot = self.plt
        # PlotextPlot.render's sizing and theme, then plotext's build() less its ANSI canvas
        # (private plotext calls, as textual-plotext itself makes; its stub of the figure leaves
        # these out).
        plot.plotsize(width, height)
        plot._set_size(width, height)
        plot.theme(self._get_plotext_theme_name(self.app.theme))
        plot._set_sizes()  # type: ignore[attr-defined]
        plot._build_matrix()  # type: ignore[attr-defined]
        matrix = plot.monitor.matrix  # type: ignore[attr-defined]
        strips = []
        for row in reversed(matrix.Rows):  # plotext's row 0 is the bottom line
            colours = list(
                zip(matrix.fullground[row], matrix.style[row], matrix.background[row], strict=True)
            )
            segments, start = [], 0
            for col in range(1, len(colours) + 1):  # one segment per run of same-coloured cells
                if col == len(colours) or colours[col] != colours[start]:
                    text = "".join(matrix.marker[row][start:col])
                    segments.append(Segment(text, _style(*colours[start])))
                    start = col
            strips.append(Strip(segments).adjust_cell_length(width))
        return strips


class MetricCharts(Horizontal):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.times: deque[float] = deque(maxlen=WINDOW)
        self.recorded = 0  # Snapshots recorded so far: the number of the newest one
        self.values: dict[str, deque[float | None]] = {
            label: deque(maxlen=WINDOW) for _, series in SERIES.values() for label, _ in series
        }

    def compose(self) -> ComposeResult:
        for i, chart_id in enumerate(SERIES):
            yield Chart(id=f"chart-{chart_id}", classes="chart shown" if i == 0 else "chart")

    def show_next(self) -> str:
        """Move the `shown` class (the one chart visible on narrow screens) to the next chart."""
        chart_ids = list(SERIES)
        plots = [self.query_one(f"#chart-{chart_id}", Chart) for chart_id in chart_ids]
        current = next(i for i, plot in enumerate(plots) if plot.has_class("shown"))
        following = (current + 1) % len(plots)
        plots[current].remove_class("shown")
        plots[following].add_class("shown")
        return SERIES[chart_ids[following]][0]

    def record(self, snapshot: Snapshot) -> None:
        self.times.append(snapshot.time)
        self.recorded += 1
        for _, series in SERIES.values():
            for label, read in series:
                self.values[label].append(read(snapshot))

    def redraw(self) -> None:
        if not self.times:
            return
        newest = self.times[-1]
        xs = [t - newest for t in self.times]
        first = self.recorded - len(xs)  # the number of the oldest Snapshot in the window
        for chart_id, (title, series) in SERIES.items():
            plot = self.query_one(f"#chart-{chart_id}", Chart)
            # At most a point per column; which ones hangs on the Snapshot's number, not its place
            # in the window, so the kept points stay put as the window slides.
            step = math.ceil(len(xs) / (plot.size.width or WINDOW))
            kept = [i for i in range(len(xs)) if (first + i) % step == 0 or i == len(xs) - 1]
            plt = plot.plt
            plt.clear_data()
            plt.title(title)
            for label, _ in series:
                values = self.values[label]
                points = [(xs[i], values[i]) for i in kept if values[i] is not None]
                if points:
                    x, y = zip(*points, strict=True)
                    side = "right" if label in RIGHT_AXIS else "left"
                    plt.plot(x, y, label=label, marker="braille", yside=side)
            plt.xlim(min(xs[0], -1.0), 0.0)
            plot.redraw()
