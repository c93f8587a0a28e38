"""Charts over a sliding window: memory (RSS, MLX active, MLX cache), tokens/s, losses.

History is recorded on every Snapshot, drawn only when the display is not frozen; the x axis is
seconds before the newest Snapshot.
"""

from __future__ import annotations

from collections import deque

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual_plotext import PlotextPlot

from xltop.snapshot import Snapshot

WINDOW = 120  # ticks kept per series
MIB = 1024 * 1024

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


class MetricCharts(Horizontal):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.times: deque[float] = deque(maxlen=WINDOW)
        self.values = {
            label: deque(maxlen=WINDOW) for _, series in SERIES.values() for label, _ in series
        }

    def compose(self) -> ComposeResult:
        for i, chart_id in enumerate(SERIES):
            yield PlotextPlot(id=f"chart-{chart_id}", classes="chart shown" if i == 0 else "chart")

    def show_next(self) -> str:
        """Move the `shown` class (the one chart visible on narrow screens) to the next chart."""
        plots = list(self.query(PlotextPlot))
        current = next(i for i, plot in enumerate(plots) if plot.has_class("shown"))
        plots[current].remove_class("shown")
        following = plots[(current + 1) % len(plots)]
        following.add_class("shown")
        return SERIES[following.id.removeprefix("chart-")][0]

    def record(self, snapshot: Snapshot) -> None:
        self.times.append(snapshot.time)
        for _, series in SERIES.values():
            for label, read in series:
                self.values[label].append(read(snapshot))

    def redraw(self) -> None:
        if not self.times:
            return
        newest = self.times[-1]
        xs = [t - newest for t in self.times]
        for chart_id, (title, series) in SERIES.items():
            plot = self.query_one(f"#chart-{chart_id}", PlotextPlot)
            plt = plot.plt
            plt.clear_data()
            plt.title(title)
            for label, _ in series:
                pairs = zip(xs, self.values[label], strict=True)
                points = [(x, y) for x, y in pairs if y is not None]
                if points:
                    x, y = zip(*points, strict=True)
                    side = "right" if label in RIGHT_AXIS else "left"
                    plt.plot(x, y, label=label, marker="braille", yside=side)
            plt.xlim(min(xs[0], -1.0), 0.0)
            plot.refresh()
