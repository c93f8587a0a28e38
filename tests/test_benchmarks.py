"""benchmarks/bench_scale.py at its --quick size: the real script in a real interpreter, its
tables and its plot; bench_ray.py's gradient-averaging figures (no cluster needed)."""

import importlib.util
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ttt_runtime.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
SCALE = ROOT / "benchmarks" / "bench_scale.py"


def run_scale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCALE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_quick_run_prints_every_layer_at_every_size_and_draws_the_plot(tmp_path):
    plot = tmp_path / "scale.svg"
    done = run_scale("--quick", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| layer ")
    ]
    # scale: 3 layers x 2 lengths, every cell a measured figure (none skipped at this size)
    scale = [r for r in rows if len(r) == 8]  # layer, tokens, then 3 prefill and 3 stream
    assert sorted((r[0], r[1]) for r in scale) == [
        (layer, tokens)
        for layer in ("TTT-Linear", "TTT-MLP", "attention")
        for tokens in ("128", "512")
    ], done.stdout
    assert all(float(cell.replace(",", "")) >= 0 for r in scale for cell in r[2:]), done.stdout
    # decode: one row per layer and hidden size, "p50 / p95" at each context
    decode = [r for r in rows if len(r) == 4]  # layer, hidden, then 2 contexts
    assert sorted((r[0], r[1]) for r in decode) == [
        (layer, hidden)
        for layer in ("TTT-Linear", "TTT-MLP", "attention")
        for hidden in ("128", "64")
    ], done.stdout
    assert all(len(cell.split(" / ")) == 2 for r in decode for cell in r[2:]), done.stdout
    svg = ET.parse(plot).getroot()
    assert svg.tag.endswith("svg")
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}polyline")) >= 7
    if shutil.which("rsvg-convert"):
        assert plot.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_past_its_bounds_is_skipped_with_the_reason_and_no_plot_unless_asked():
    done = run_scale("--quick", "--attention-tokens", "128", "--attention-gib", "0.00001")
    assert done.returncode == 0, done.stderr
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|")[:3])
        for line in done.stdout.splitlines()
    }
    assert ("attention", "128", "skipped") in rows  # 128 x 128 scores: 64 KiB > 0.00001 GiB
    assert "attention stream at 512 tokens skipped: over --attention-tokens 128" in done.stdout
    assert "attention prefill at 128 tokens skipped: its scores alone would be" in done.stdout
    assert "plot:" not in done.stdout


def test_bad_sizes_are_one_line_and_exit_2():
    for args, words in (
        (("--tokens", "0"), "--tokens"),
        (("--hidden", "100"), "--hidden 100"),
        (("--decode-hidden", "64", "96"), "--decode-hidden 96"),
        (("--plot", "/dev/null/scale.svg"), "--plot /dev/null/scale.svg"),
    ):
        done = run_scale("--quick", *args)
        assert done.returncode == 2, done.stdout
        assert words in done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr


def test_ray_bench_averages_real_gradients_within_the_quantization_step(monkeypatch):
    """bench_ray's gradient figures on the tiny model: a u8 payload is a quarter of float32's,
    uncompressed averaging is exact to float32, and a u8 average is off by at most half a level
    (exact) or one level (SWAR's rounding on top); a level is at most 2 max |g| / 255."""
    pytest.importorskip("ray")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run: its neighbours import
    spec = importlib.util.spec_from_file_location("bench_ray", ROOT / "benchmarks" / "bench_ray.py")
    bench_ray = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ray)
    config = RunConfig.from_preset("tiny").with_overrides(batch_size=2)
    none, u8, u8_swar = (
        bench_ray.averaging_figures(config, compression, average, repeats=1)
        for compression, average in (("none", "exact"), ("u8", "exact"), ("u8", "swar"))
    )
    assert u8["bytes"] < none["bytes"] / 3.9 and u8["bytes"] == u8_swar["bytes"]
    assert none["max"] < 1e-6 and none["rms"] < 1e-6
    assert 0 < u8["max"] <= 1.01 / 255 and u8["rms"] > 0
    assert 0 < u8_swar["max"] <= 2.01 / 255
    assert all(f["payload_ms"] > 0 and f["average_ms"] > 0 for f in (none, u8, u8_swar))
