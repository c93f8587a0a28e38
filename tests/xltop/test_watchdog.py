"""Memory watchdog: limit parsing here; both actions against a real run in test_runs_e2e."""

from __future__ import annotations

import pytest

from xltop.snapshot import MlxMemory, RunInfo
from xltop.watchdog import MIB, Threshold, run_memory


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [
        ("80%", 1000 * MIB, 800 * MIB),
        ("512", 0, 512 * MIB),
        ("512MiB", 0, 512 * MIB),
        ("1.5GiB", 0, 1536 * MIB),
        ("2g", 0, 2048 * MIB),
    ],
)
def test_limits_parse_as_percent_or_size(text, total, expected):
    assert Threshold.parse(text).bytes_of(total) == expected


@pytest.mark.parametrize("text", ["", "abc", "0", "-5%", "101%", "5 TB"])
def test_bad_limits_name_the_value(text):
    with pytest.raises(ValueError, match="memory limit|at most 100"):
        Threshold.parse(text)


def test_run_memory_is_the_larger_of_rss_and_mlx():
    mlx = MlxMemory(active=300 * MIB, cache=100 * MIB, peak=0, limit=0, backend="gpu", device="")
    assert run_memory(RunInfo(state="running", rss=200 * MIB, mlx=mlx)) == 400 * MIB
    assert run_memory(RunInfo(state="running", rss=900 * MIB, mlx=mlx)) == 900 * MIB
    assert run_memory(RunInfo(state="running")) == 0
