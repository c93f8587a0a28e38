"""Charts over a sliding window: memory (RSS, MLX active, MLX cache), tokens/s, losses.

History is recorded on every Snapshot, drawn only when the display is not frozen; the x axis is
seconds before the newest Snapshot. A chart is drawn here, straight to Textual strips through the
public line API: braille dots (2x4 a cell), at most one point per column, y labels on the left
(and on the right for a series with its own scale), a legend in the top left corner. Drawing
with plotext (its private matrix build) cost ~6 ms a chart a tick, most of a tick's paint;
textual-plot's PlotWidget measured slower still (benchmarks in docs/tui-cost.md).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.strip import Strip
from textual.widget import Widget

from xltop.snapshot import Snapshot
from xltop.units import MIB

WINDOW = 120  # ticks kept per series

# chart id -> title and its series: (label, function of a Snapshot -> value or None). The inner
# loss has its own scale (right axis): on the outer loss's axis one of the two would be flat.
RIGHT_AXIS = {"inner mean"}
SERIES: dict[str, tuple[str, tuple[tuple[str, Callable[[Snapshot], float | None]], ...]]] = {
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
            # adapt mode: the unadapted base on the sampled chunks, beside the adapted outer bpb
            ("base bpb", lambda s: s.run.baseline_bpb if s.run else None),
        ),
    ),
}
COLOURS = ("bright_blue", "bright_green", "bright_red")  # a chart's series, in order
LABEL_WIDTH = 7  # y labels: up to 7 cells ("-1.23e+04" is cut to its significant part)
TITLE = Style(bold=True)
AXIS = Style(dim=True)
# Braille dot bits by (column, row) within a cell: U+2800 + the bits of the dots that are set.
DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def _mean_inner_loss(snapshot: Snapshot) -> float | None:
    run = snapshot.run
    values = [x.inner_loss_after for x in (run.layers if run else ()) if x.inner_loss_after]
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    colour: str
    right: bool = False  # on the right axis, with its own scale


def label(value: float) -> str:
    """A tick label in LABEL_WIDTH cells at most."""
    for digits in (4, 3, 2, 1):
        text = f"{value:.{digits}g}"
        if len(text) <= LABEL_WIDTH:
            return text
    return text[:LABEL_WIDTH]


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12 * max(1.0, abs(high)):  # a flat line sits mid-height
        pad = max(abs(high) * 0.05, 1e-9)
        return low - pad, high + pad
    return low, high


def draw(title: str, series: Sequence[Series], xlim: tuple[float, float], width: int,
         height: int) -> list[Strip]:  # fmt: skip
    """The chart as `height` strips of `width` cells: a title line, the plot, an x labels line."""
    heading = Strip([Segment(title[:width].center(width), TITLE)])
    axes = [[s for s in series if s.points and s.right == right] for right in (False, True)]
    spans = [_span([y for s in side for _, y in s.points]) if side else None for side in axes]
    left_w, right_w = (LABEL_WIDTH + 1 if side else 0 for side in axes)
    rows, plot_w = height - 2, width - left_w - right_w
    if rows < 2 or plot_w < 4:  # too small to plot: the title only
        return ([heading] + [Strip.blank(width, Style.null())] * (height - 1))[:height]
    bits = [[0] * plot_w for _ in range(rows)]
    colours: list[list[str | None]] = [[None] * plot_w for _ in range(rows)]
    for side, span in zip(axes, spans, strict=True):
        for s in side:
            dots = [_dot(x, y, xlim, span, plot_w * 2, rows * 4) for x, y in s.points]
            pairs = list(zip(dots[:-1], dots[1:], strict=True)) or [(dots[0], dots[0])]
            for (ax, ay), (bx, by) in pairs:  # a lone point is a segment from it to itself
                steps = max(abs(bx - ax), abs(by - ay), 1)
                for i in range(steps + 1):  # the dots along the segment from a to b
                    dx, dy = ax + (bx - ax) * i // steps, ay + (by - ay) * i // steps
                    row, col = dy >> 2, dx >> 1
                    bits[row][col] |= DOTS[dx & 1][dy & 3]
                    colours[row][col] = s.colour
    ticks = _tick_rows(rows)
    legend = [s for s in series if s.points][:rows]
    strips = [heading]
    for row in range(rows):
        cells = [chr(0x2800 + b) if b else " " for b in bits[row]]
        styles = colours[row]  # a colour's name a cell: cheaper to compare than Rich styles
        if row < len(legend):  # the legend, in the top left corner
            text = f"⣿ {legend[row].label}"[: plot_w - 1]
            cells[1 : 1 + len(text)] = text
            styles[1 : 1 + len(text)] = [legend[row].colour] + [None] * (len(text) - 1)
        segments = []
        if spans[0] is not None:
            segments.append(_y_label(spans[0], row, rows, ticks, left=True))
        start = 0
        for col in range(1, plot_w + 1):  # one segment per run of same-styled cells
            if col == plot_w or styles[col] != styles[start]:
                segments.append(Segment("".join(cells[start:col]), _style(styles[start])))
                start = col
        if spans[1] is not None:
            segments.append(_y_label(spans[1], row, rows, ticks, left=False))
        strips.append(Strip(segments, width))
    strips.append(_x_labels(xlim, left_w, plot_w, width))
    return strips


def _dot(x: float, y: float, xlim: tuple[float, float], span: tuple[float, float] | None,
         dots_w: int, dots_h: int) -> tuple[int, int]:  # fmt: skip
    """The braille dot (column, row from the top) of a point, kept inside the plot."""
    (x0, x1), (y0, y1) = xlim, span or (0.0, 1.0)
    column = round((x - x0) / (x1 - x0) * (dots_w - 1))
    row = round((y1 - y) / (y1 - y0) * (dots_h - 1))
    return min(max(column, 0), dots_w - 1), min(max(row, 0), dots_h - 1)


@functools.cache
def _style(colour: str | None) -> Style:
    # never None: Textual's filters (NO_COLOR's Monochrome) read every segment's style
    return Style.null() if colour is None else Style(color=colour)


def _y_label(span: tuple[float, float], row: int, rows: int, ticks: set[int], left: bool):
    low, high = span
    text = label(high - (high - low) * row / (rows - 1)) if row in ticks else ""
    if left:
        return Segment(text.rjust(LABEL_WIDTH) + ("┤" if row in ticks else "│"), AXIS)
    return Segment(("├" if row in ticks else "│") + text.ljust(LABEL_WIDTH), AXIS)


def _tick_rows(rows: int) -> set[int]:
    """The plot rows that carry a y label: top, bottom, and about every fourth between."""
    count = max(2, min(5, rows // 3))
    return {round(i * (rows - 1) / (count - 1)) for i in range(count)}


def _x_labels(xlim: tuple[float, float], offset: int, plot_w: int, width: int) -> Strip:
    line = [" "] * width
    count = max(2, min(5, plot_w // 10))
    for i in range(count):
        value = xlim[0] + (xlim[1] - xlim[0]) * i / (count - 1)
        text = f"{value:.0f}" if abs(xlim[1] - xlim[0]) >= 10 else f"{value:.1f}"
        at = offset + round(i * (plot_w - 1) / (count - 1)) - len(text) // 2
        at = min(max(at, 0), width - len(text))
        line[at : at + len(text)] = text
    return Strip([Segment("".join(line), AXIS)])


class Chart(Widget):
    """One chart, drawn through Textual's line API and rebuilt once per data change or resize."""

    def __init__(self, title: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.series: list[Series] = []
        self.xlim = (-1.0, 0.0)
        self._strips: list[Strip] = []
        self._built_for: tuple | None = None
        self.version = 0  # bumped by `show`: the data changed

    def show(self, series: list[Series], xlim: tuple[float, float]) -> None:
        self.series, self.xlim = series, xlim
        self.version += 1
        self.refresh()

    def render_line(self, y: int) -> Strip:
        key = (self.version, self.size)
        if key != self._built_for:
            width, height = self.size
            self._strips = draw(self.title, self.series, self.xlim, width, height)
            self._built_for = key
        return (
            self._strips[y] if y < len(self._strips) else Strip.blank(self.size.width, Style.null())
        )


class MetricCharts(Horizontal):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.times: deque[float] = deque(maxlen=WINDOW)
        self.recorded = 0  # Snapshots recorded so far: the number of the newest one
        self.values: dict[str, deque[float | None]] = {
            label: deque(maxlen=WINDOW) for _, series in SERIES.values() for label, _ in series
        }

    def compose(self) -> ComposeResult:
        for i, (chart_id, (title, _)) in enumerate(SERIES.items()):
            yield Chart(title, id=f"chart-{chart_id}", classes="chart shown" if i == 0 else "chart")

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
        for chart_id, (_, series) in SERIES.items():
            plot = self.query_one(f"#chart-{chart_id}", Chart)
            # At most a point per column; which ones hangs on the Snapshot's number, not its place
            # in the window, so the kept points stay put as the window slides.
            step = math.ceil(len(xs) / (plot.size.width or WINDOW))
            kept = [i for i in range(len(xs)) if (first + i) % step == 0 or i == len(xs) - 1]
            shown = [
                Series(
                    label,
                    [(xs[i], y) for i in kept if (y := self.values[label][i]) is not None],
                    COLOURS[n],
                    right=label in RIGHT_AXIS,
                )
                for n, (label, _) in enumerate(series)
            ]
            plot.show(shown, (min(xs[0], -1.0), 0.0))
