"""Prefill tokens/s of TTT-Linear and TTT-MLP on MLX's CPU backend, side by side: MLX's bundled
BLAS vs an optimized BLAS (OpenBLAS) preloaded, and the compiled vs the plain mini-batch scan.

    python benchmarks/bench_layers.py                 # B=1, L=2048, d=512, 8 heads, K=16
    python benchmarks/bench_layers.py --repeats 15 --no-bundled
    python benchmarks/bench_layers.py --no-bundled \
        --reference-python REFVENV/bin/python --reference-dir TTT_LM_PYTORCH_CHECKOUT

Each configuration runs in fresh interpreters (a BLAS can only be preloaded at exec time), in
interleaved rounds; the table shows the median tokens/s of the timed calls and their spread
(min-max), after warm-up calls that also compile. On a shared machine the spread says how
much the load moved things. The bundled BLAS is ~40x slower at GEMM: it gets two timed calls.

With --reference-python (a Python with torch and transformers) and --reference-dir (a checkout
of github.com/test-time-training/ttt-lm-pytorch, whose ttt.py is imported from there, never
copied), the PyTorch reference's TTTLinear/TTTMLP run in the same rounds, on REFERENCE_THREADS
threads, and the table ends with ours (OpenBLAS, compiled scan) over the reference.
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
REFERENCE = "reference"  # the column of the PyTorch reference, in its own Python
LABELS = {"linear": "TTT-Linear", "mlp": "TTT-MLP"}
# the targets on the project's 2-core CI machine, OpenBLAS preloaded
TARGETS = {"linear": 30_000, "mlp": 14_000}
REFERENCE_THREADS = 2  # the CI machine's cores


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


def time_reference_layer(ttt, kind: str, args) -> list[float]:
    """Seconds per prefill call of the PyTorch reference's layer, after warm-up."""
    import torch

    config = ttt.TTTConfig(
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        mini_batch_size=args.mini_batch,
        ttt_layer_type=kind,
    )
    layer = {"linear": ttt.TTTLinear, "mlp": ttt.TTTMLP}[kind](config, layer_idx=0).eval()
    x = torch.randn(1, args.length, args.hidden)
    position_ids = torch.arange(args.length)[None]
    seconds = []
    with torch.no_grad():
        for call in range(args.warmup + args.repeats):
            start = time.perf_counter()
            layer(x, position_ids=position_ids)
            if call >= args.warmup:
                seconds.append(time.perf_counter() - start)
    return seconds


def worker(args) -> None:
    if args.reference_worker:
        import importlib.util

        import torch

        torch.set_num_threads(REFERENCE_THREADS)
        spec = importlib.util.spec_from_file_location("ttt", Path(args.reference_worker, "ttt.py"))
        ttt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ttt)
        results = {kind: time_reference_layer(ttt, kind, args) for kind in LAYERS}
        blas = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    else:
        results = {kind: time_layer(kind, args, args.compiled) for kind in LAYERS}
        blas = loaded_blas()
    print(json.dumps({"blas": blas, "seconds": results}))


def run_config(args, preload: str | None, compiled: bool, repeats: int, warmup: int) -> dict:
    """One worker run: ours (compiled or not, `preload` or the bundled BLAS), or with
    preload REFERENCE the PyTorch reference, in the reference's Python."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    python, mode = sys.executable, ["--compiled" if compiled else "--plain"]
    if preload == REFERENCE:
        python, mode = args.reference_python, ["--reference-worker", args.reference_dir]
    elif preload:
        env["LD_PRELOAD"] = preload
    cmd = [
        python, __file__, "--worker", "--length", str(args.length),
        "--hidden", str(args.hidden), "--heads", str(args.heads),
        "--mini-batch", str(args.mini_batch), "--repeats", str(repeats),
        "--warmup", str(warmup), *mode,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"benchmark worker failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_reference(parser, args) -> None:
    """Both reference options or neither, each naming what is really there (exit 2 if not)."""
    given = (args.reference_python, args.reference_dir)
    if any(given) and not all(given):
        parser.error("--reference-python and --reference-dir go together")
    if args.reference_python and not os.access(args.reference_python, os.X_OK):
        parser.error(f"--reference-python {args.reference_python}: not an executable")
    if args.reference_dir and not Path(args.reference_dir, "ttt.py").is_file():
        parser.error(f"--reference-dir {args.reference_dir}: no ttt.py there")


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
    parser.add_argument(
        "--reference-python", metavar="PYTHON", help="a Python with torch and transformers"
    )
    parser.add_argument(
        "--reference-dir", metavar="DIR", help="a ttt-lm-pytorch checkout (its ttt.py)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference-worker", metavar="DIR", help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compiled", action="store_true", default=True, help=argparse.SUPPRESS)
    mode.add_argument("--plain", dest="compiled", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    check_reference(parser, args)

    import mlx.core as mx

    openblas = find_optimized_blas()
    columns = []  # (title, preload, compiled)
    if not args.no_bundled:
        columns.append(("bundled BLAS", None, True))
    if openblas:
        columns.append(("OpenBLAS", openblas, True))
        columns.append(("OpenBLAS, plain scan", openblas, False))
    if args.reference_python:
        columns.append(("PyTorch reference", REFERENCE, False))
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
    if openblas and args.reference_python:
        ours, reference = results[[c[1] for c in columns].index(openblas)], results[-1]
        for kind in LAYERS:
            ratio = statistics.median(reference["seconds"][kind]) / statistics.median(
                ours["seconds"][kind]
            )
            print(f"{LABELS[kind]}: ours (OpenBLAS) is {ratio:.2f}x the PyTorch reference")
    elif not args.reference_python:
        print("(no PyTorch reference: see --reference-python and --reference-dir)")
    if openblas and not args.no_bundled:
        for kind in LAYERS:
            bundled = statistics.median(results[0]["seconds"][kind])
            optimized = statistics.median(results[1]["seconds"][kind])
            speedup = bundled / optimized
            print(f"{LABELS[kind]}: OpenBLAS preloaded is {speedup:.1f}x the bundled BLAS")


if __name__ == "__main__":
    main()
