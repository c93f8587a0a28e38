"""Prefill tokens/s of TTT-Linear and TTT-MLP on MLX's CPU backend, side by side: MLX's bundled
BLAS vs an optimized BLAS (OpenBLAS) preloaded, and the compiled vs the plain mini-batch scan.

    python benchmarks/bench_layers.py                 # B=1, L=2048, d=512, 8 heads, K=16
    python benchmarks/bench_layers.py --repeats 15 --no-bundled

Each configuration runs in fresh interpreters (a BLAS can only be preloaded at exec time), in
interleaved rounds; the table shows the median tokens/s of the timed calls and their spread
(min-max), after warm-up calls that also compile. On a shared machine the spread says how
much the load moved things. The bundled BLAS is ~40x slower at GEMM: it gets two timed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ttt_runtime.blas import find_optimized_blas, loaded_blas  # noqa: E402

LAYERS = ("linear", "mlp")
LABELS = {"linear": "TTT-Linear", "mlp": "TTT-MLP"}
# the targets on the project's 2-core CI machine, OpenBLAS preloaded
TARGETS = {"linear": 30_000, "mlp": 14_000}


def time_layer(kind: str, args, compiled: bool) -> list[float]:
    """Seconds per prefill call of one layer, after warm-up."""
    import mlx.core as mx

    from ttt_runtime.layers import TTTMLP, TTTLayerConfig, TTTLinear

    cfg = TTTLayerConfig(args.hidden, args.heads, mini_batch_size=args.mini_batch, compile=compiled)
    layer = {"linear": TTTLinear, "mlp": TTTMLP}[kind](cfg)
    x = mx.random.normal((1, args.length, args.hidden))
    mx.eval(layer.parameters(), x)
    for _ in range(args.warmup):
        mx.eval(layer(x))
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        mx.eval(layer(x))
        seconds.append(time.perf_counter() - start)
    return seconds


def worker(args) -> None:
    results = {kind: time_layer(kind, args, args.compiled) for kind in LAYERS}
    print(json.dumps({"blas": loaded_blas(), "seconds": results}))


def run_config(args, preload: str | None, compiled: bool, repeats: int, warmup: int) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    cmd = [
        sys.executable, __file__, "--worker", "--length", str(args.length),
        "--hidden", str(args.hidden), "--heads", str(args.heads),
        "--mini-batch", str(args.mini_batch), "--repeats", str(repeats),
        "--warmup", str(warmup), "--compiled" if compiled else "--plain",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"benchmark worker failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per configuration")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved worker runs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-bundled", action="store_true", help="skip the slow bundled BLAS")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compiled", action="store_true", default=True, help=argparse.SUPPRESS)
    mode.add_argument("--plain", dest="compiled", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import mlx.core as mx

    openblas = find_optimized_blas()
    columns = []  # (title, preload, compiled)
    if not args.no_bundled:
        columns.append(("bundled BLAS", None, True))
    if openblas:
        columns.append(("OpenBLAS", openblas, True))
        columns.append(("OpenBLAS, plain scan", openblas, False))
    if not columns:
        sys.exit("nothing to run: no optimized BLAS found here, and --no-bundled was given")
    # rounds interleave the configurations, so that a change in the machine's load while the
    # benchmark runs spreads over all columns instead of favouring one
    results = [{"blas": "", "seconds": {kind: [] for kind in LAYERS}} for _ in columns]
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        for (_, preload, compiled), result in zip(columns, results, strict=True):
            if preload is None and round_index:  # ~40x slower at GEMM: one round is enough
                continue
            if preload is None:
                done = run_config(args, preload, compiled, repeats=2, warmup=1)
            else:
                repeats = max(1, args.repeats // args.rounds)
                done = run_config(args, preload, compiled, repeats, args.warmup)
            result["blas"] = done["blas"]
            for kind in LAYERS:
                result["seconds"][kind] += done["seconds"][kind]
    load_after = os.getloadavg()

    print(
        f"TTT layer prefill: B=1, L={args.length}, hidden {args.hidden}, {args.heads} heads, "
        f"K={args.mini_batch}, float32, MLX {mx.__version__} CPU backend"
    )
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, load average {load_before[0]:.2f} "
        f"before / {load_after[0]:.2f} after; OpenBLAS: {openblas or 'not found'}"
    )
    print("tokens/s, median of the timed calls (min-max in brackets)\n")
    width = 28
    header = f"{'layer':<12}" + "".join(f"{title:>{width}}" for title, *_ in columns)
    print(header + f"{'target':>10}")
    for kind in LAYERS:
        cells = []
        for result in results:
            rates = [args.length / s for s in result["seconds"][kind]]
            cell = f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"
            cells.append(f"{cell:>{width}}")
        print(f"{LABELS[kind]:<12}" + "".join(cells) + f"{TARGETS[kind]:>10,}")
    used = ", ".join(f"{t}: {r['blas']}" for (t, *_), r in zip(columns, results, strict=True))
    print(f"\nBLAS each worker had mapped: {used}")
    if openblas and not args.no_bundled:
        for kind in LAYERS:
            bundled = statistics.median(results[0]["seconds"][kind])
            optimized = statistics.median(results[1]["seconds"][kind])
            speedup = bundled / optimized
            print(f"{LABELS[kind]}: OpenBLAS preloaded is {speedup:.1f}x the bundled BLAS")


if __name__ == "__main__":
    main()
