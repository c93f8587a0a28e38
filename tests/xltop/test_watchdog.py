"""Memory watchdog: limit parsing here; both actions against a real run in test_runs_e2e."""

from __future__ import annotations

import pytest
from xltop_helpers import read_rows, run_xltop

from xltop.snapshot import MlxMemory, RunInfo, RunState
from xltop.units import MIB
from xltop.watchdog import Threshold, run_memory


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
    assert run_memory(RunInfo(state=RunState.RUNNING, rss=200 * MIB, mlx=mlx)) == 400 * MIB
    assert run_memory(RunInfo(state=RunState.RUNNING, rss=900 * MIB, mlx=mlx)) == 900 * MIB
    assert run_memory(RunInfo(state=RunState.RUNNING)) == 0


def test_both_actions_fire_against_a_real_run(tmp_path):
    path = tmp_path / "wd.csv"
    result = run_xltop("--headless", "--preset", "tiny", "--csv", str(path), "--count", "5",
                       "--interval", "0.3", "--mem-soft", "1MiB", "--mem-hard", "2MiB")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "clear its MLX cache" in result.stderr and "paused the run" in result.stderr
    assert "FAILED" not in result.stderr
    rows = read_rows(path)
    events = " ".join(r["event"] for r in rows)
    assert "soft limit" in events and "hard limit" in events
    assert rows[-1]["run_state"] == "paused"
    # Each limit fires once per crossing, not on every tick above it.
    assert events.count("soft limit") == 1 and events.count("hard limit") == 1
