"""The charts' drawing (xltop.tui.widgets.charts.draw): every size and every series shape gives
whole lines, and the points land where their values say."""

from __future__ import annotations

import pytest

from xltop.tui.widgets.charts import Series, draw

RISING = Series("up", [(-10.0 + i, float(i)) for i in range(11)], "bright_blue")
FLAT = Series("flat", [(-3.0, 5.0), (-2.0, 5.0), (0.0, 5.0)], "bright_green")
LONE = Series("lone", [(0.0, -1e9)], "bright_red", right=True)
EMPTY = Series("empty", [], "bright_blue")


@pytest.mark.parametrize("width,height", [(39, 15), (80, 7), (12, 4), (3, 2), (1, 1), (40, 0)])
@pytest.mark.parametrize("series", [[RISING, LONE], [FLAT], [LONE], [EMPTY], []])
def test_every_size_and_series_gives_whole_lines(width, height, series):
    strips = draw("a title", series, (-10.0, 0.0), width, height)
    assert len(strips) == height
    assert all(strip.cell_length == width for strip in strips)


def test_the_points_land_where_their_values_say():
    lines = [strip.text for strip in draw("t", [RISING], (-10.0, 0.0), 40, 12)]
    assert lines[0].strip() == "t"
    plot = [line[8:] for line in lines[1:-1]]  # right of the y labels and their axis
    assert plot[0].rstrip()[-1] != " " and plot[-1][0] != " "  # the top right, the bottom left
    assert lines[1].lstrip().startswith("10┤") and lines[-2].lstrip().startswith("0┤")
    assert lines[-1].split() == ["-10", "-5", "0"]
