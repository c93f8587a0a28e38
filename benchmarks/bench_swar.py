"""SWAR figures, side by side in one run: packed-lane averages against the memory-bandwidth
ceiling (a plain add of the same arrays), quantize/dequantize throughput, ExactAccumulator adds
per second, and the error of summing 1e6 mixed-magnitude float32 updates.

    .venv/bin/python benchmarks/bench_swar.py [--mib 64] [--repeats 5] [--updates 1000000]

GB/s counts the bytes an operation must move: both inputs read and the output written.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from fractions import Fraction

import mlx.core as mx
import numpy as np

from ttt_runtime import swar

AVERAGES = {
    "avg_u8_trunc": swar.avg_u8_trunc,
    "avg_u8_round": swar.avg_u8_round,
    "avg_u16_trunc": swar.avg_u16_trunc,
    "avg_u16_round": swar.avg_u16_round,
}


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call; MLX results are evaluated inside."""

    def timed() -> float:
        start = time.perf_counter()
        out = fn()
        if isinstance(out, mx.array | tuple | list):
            mx.eval(out)
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(repeats))


def gbps(n_bytes: int, seconds: float) -> float:
    return n_bytes / seconds / 1e9


def bench_averages(mib: int, repeats: int) -> None:
    n = mib * 2**20 // 4
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 2**32, n, dtype=np.uint32) for _ in range(2))
    a_mx, b_mx = mx.array(a), mx.array(b)
    moved = 3 * a.nbytes
    ceiling = {
        "numpy": gbps(moved, median_seconds(lambda: np.add(a, b), repeats)),
        "mlx": gbps(moved, median_seconds(lambda: mx.add(a_mx, b_mx), repeats)),
    }
    print(f"\nPacked-lane averages over {mib} MiB uint32 inputs (GB/s, median of {repeats})")
    print(f"{'operation':<15}{'backend':<8}{'arith':>9}{'bitwise':>9}{'add':>9}"
          f"{'bitwise/add':>13}{'bitwise/arith':>15}")  # fmt: skip
    for name, average in AVERAGES.items():
        for backend, (x, y) in (("numpy", (a, b)), ("mlx", (a_mx, b_mx))):
            speed = {
                form: gbps(
                    moved,
                    median_seconds(lambda f=form, g=average, x=x, y=y: g(x, y, form=f), repeats),
                )
                for form in swar.FORMS
            }
            print(f"{name:<15}{backend:<8}{speed['arith']:>9.2f}{speed['bitwise']:>9.2f}"
                  f"{ceiling[backend]:>9.2f}{speed['bitwise'] / ceiling[backend]:>13.2f}"
                  f"{speed['bitwise'] / speed['arith']:>15.1f}")  # fmt: skip


def bench_quantize(mib: int, repeats: int) -> None:
    n = mib * 2**20 // 4
    x = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
    x_mx = mx.array(x)
    print(f"\nquantize / dequantize of {mib} MiB float32 (GB/s of float32 data, median of "
          f"{repeats})")  # fmt: skip
    print(f"{'bits':<6}{'backend':<8}{'quantize':>10}{'dequantize':>12}{'wire bytes':>12}")
    for bits in (8, 16):
        for backend, data in (("numpy", x), ("mlx", x_mx)):
            q = swar.quantize(data, bits)
            quant = gbps(
                x.nbytes, median_seconds(lambda d=data, b=bits: swar.quantize(d, b), repeats)
            )
            dequant = gbps(x.nbytes, median_seconds(lambda q=q: swar.dequantize(q), repeats))
            print(f"{bits:<6}{backend:<8}{quant:>10.2f}{dequant:>12.2f}"
                  f"{q.nbytes / x.nbytes:>11.0%}")  # fmt: skip


def bench_exact_adds(repeats: int) -> None:
    print(f"\nExactAccumulator element-adds per second (median of {repeats})")
    print(f"{'case':<44}{'adds/s':>12}{'float32 add/s':>15}{'exact/f32':>10}")
    rng = np.random.default_rng(2)
    cases = {  # name: (accumulator shape, addend)
        "add() of one 1M-element float32 array": ((2**20,), (2**20,)),
        "add() of a (64, 128, 128) stack of updates": ((128, 128), (64, 128, 128)),
        "add() of a (1000, 16, 16) stack of updates": ((16, 16), (1000, 16, 16)),
    }
    for name, (shape, addend_shape) in cases.items():
        addend = rng.standard_normal(addend_shape, dtype=np.float32)
        acc = swar.ExactAccumulator(shape)
        seconds = median_seconds(lambda acc=acc, x=addend: acc.add(x), repeats)
        plain = np.zeros(shape, np.float32)
        rows = addend.reshape(-1, *shape)
        plain_seconds = median_seconds(
            lambda p=plain, r=rows: [np.add(p, row, out=p) for row in r], repeats
        )
        print(f"{name:<44}{addend.size / seconds:>12.3g}{addend.size / plain_seconds:>15.3g}"
              f"{plain_seconds / seconds:>10.3f}")  # fmt: skip


def kahan_float32(values: np.ndarray) -> np.float32:
    total = compensation = np.float32(0)
    for v in values:
        y = v - compensation
        t = total + y
        compensation = (t - total) - y
        total = t
    return total


def error_study(n_updates: int) -> None:
    # a weight of order 1 receiving many signed updates from 1e-9 to 1e-1 (log-uniform), the
    # shape of fast-weight updates over a long stream
    rng = np.random.default_rng(3)
    magnitudes = 10.0 ** rng.uniform(-9, -1, n_updates)
    signs = np.where(rng.random(n_updates) < 0.5, -1.0, 1.0)
    updates = np.concatenate([[1.0], signs * magnitudes]).astype(np.float32)
    exact = sum(map(Fraction, updates.astype(np.float64).tolist()), Fraction(0))
    acc = swar.ExactAccumulator(())
    acc.add(updates)
    sums = {
        "(the exact sum rounded to float32: float32's best)": np.float32(float(exact)),
        "float32, one add at a time (what a run does)": np.cumsum(updates, dtype=np.float32)[-1],
        "float32, NumPy pairwise np.sum": np.sum(updates, dtype=np.float32),
        "float32, Kahan compensated": kahan_float32(updates),
        "float64, one add at a time": np.cumsum(updates, dtype=np.float64)[-1],
        "ExactAccumulator (Q64.64), rounded to float64": acc.value(),
    }
    print(f"\nError study: 1 + {n_updates:.0e} float32 updates, |u| log-uniform in [1e-9, 1e-1],"
          f" random signs")  # fmt: skip
    print(f"exact sum (Fraction) = {float(exact)!r}; float32 spacing at it: "
          f"{float(np.spacing(np.float32(float(exact)))):.3g}")  # fmt: skip
    print(f"{'method':<48}{'abs error':>12}{'rel error':>12}")
    for name, value in sums.items():
        error = abs(Fraction(float(value)) - exact)
        print(f"{name:<48}{float(error):>12.3g}{float(error / abs(exact)):>12.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="size of each input (MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure")
    parser.add_argument("--updates", type=int, default=10**6, help="updates in the error study")
    args = parser.parse_args()
    print(f"bench_swar on {platform.machine()}, {mx.default_device()}, MLX {mx.__version__}, "
          f"NumPy {np.__version__} (figures move with machine load)")  # fmt: skip
    bench_averages(args.mib, args.repeats)
    bench_quantize(args.mib, args.repeats)
    bench_exact_adds(args.repeats)
    error_study(args.updates)


if __name__ == "__main__":
    main()
