"""Test-time adaptation: bits per byte of every adapt method (docs/adaptation.md) on the shifted
streams (prose, tables) and on held-out code, the in-domain control, beside its speed and extra
memory. Every method starts from the same base and reads the same chunks; each seed picks other
chunks (and LoRA's random start). Three seeds: each method's gap to the base (`reset`) on
the same chunks, mean and standard deviation.

The base is --base (default base.safetensors, from `make base`); without one, a small base is
trained first (`--base-steps`, the `base` preset), which takes minutes.

    python benchmarks/bench_adapt.py [--base base.safetensors] [--chunks 48] [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import mlx.core as mx
import numpy as np

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.adapt import METHODS
from ttt_runtime.adapt.make_base import train_base
from ttt_runtime.config import RunConfig
from ttt_runtime.corpora import SHIFTED, CorpusStream
from ttt_runtime.learners import AdaptLearner
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import LN2

STREAMS = (*SHIFTED, "code-heldout")  # the last: in-domain, adaptation must not hurt it
MIB = 1 << 20


def chunks(corpus: str, seq_len: int, count: int, seed: int) -> list[tuple[mx.array, mx.array]]:
    """`count` consecutive chunks of `corpus` from a place the seed picks."""
    stream = CorpusStream(corpus, seq_len)
    stream.position = int(np.random.default_rng(seed).integers(0, stream.total))
    return [tuple(mx.array(a) for a in next(stream)) for _ in range(count)]  # type: ignore[misc]


def measure(base: ckpt.Checkpoint, config: RunConfig, batches) -> tuple[float, float, int]:
    """(mean bpb, tokens/s after the first chunk, peak MLX memory) of one method on `batches`."""
    mx.clear_cache()
    mx.reset_peak_memory()
    learner = AdaptLearner(TTTModel(config.model_config()), config, base)
    losses, seconds = [], []
    for inputs, targets in batches:
        result = learner.step(inputs, targets, sampled=False)
        losses.append(result.loss.item() / LN2)
        seconds.append(result.seconds)
    tokens = sum(inputs.size for inputs, _ in batches[1:])
    return float(np.mean(losses)), tokens / sum(seconds[1:]), mx.get_peak_memory()


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):+.3f}+-{statistics.pstdev(values):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="base.safetensors")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--chunks", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--adapt-lr", type=float, default=RunConfig.adapt_lr)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.base
        if not os.path.exists(path):
            print(f"no base at {path}: training one ({args.base_steps} steps)", flush=True)
            config = RunConfig.from_preset("base")
            path = train_base(config, args.base_steps, os.path.join(scratch, "base.safetensors"))
            path = path.path
        base = ckpt.load(path)
        print(f"base {path}: step {base.step}; {args.chunks} chunks of {args.seq_len} bytes per "
              f"stream and seed, {args.seeds} seeds, adapt_lr {args.adapt_lr:g}")  # fmt: skip
        table = run(base, args)
    print_table(table, args.methods)
    return 0


def run(base: ckpt.Checkpoint, args) -> dict:
    """{(method, stream): [(bpb, tok/s, peak bytes) per seed]}"""
    table: dict = {}
    settings = {
        "mode": "adapt",
        "batch_size": 1,
        "seq_len": args.seq_len,
        "adapt_lr": args.adapt_lr,
    }
    for seed in range(args.seeds):
        for stream in STREAMS:
            batches = chunks(stream, args.seq_len, args.chunks, seed)
            for method in args.methods:
                config = RunConfig().with_overrides(
                    **{**base.config, **settings, "adapt_method": method, "seed": seed}
                )
                start = time.perf_counter()
                figures = measure(base, config, batches)
                table.setdefault((method, stream), []).append(figures)
                print(f"  seed {seed} {stream:12} {method:8} {figures[0]:.3f} bpb "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return table


def print_table(table: dict, methods: list[str]) -> None:
    print(f"\n{'method':8} " + " ".join(f"{s + ' bpb (vs base)':>24}" for s in STREAMS)
          + f" {'tok/s':>7} {'extra MiB':>9}")  # fmt: skip
    lowest = min(max(p for _, _, p in table[m, s]) for m in methods for s in STREAMS)
    for method in methods:
        cells = []
        for stream in STREAMS:
            bpbs = [bpb for bpb, _, _ in table[method, stream]]
            base = [bpb for bpb, _, _ in table.get(("reset", stream), [])] or bpbs
            gaps = [a - b for a, b in zip(bpbs, base, strict=True)]
            cells.append(f"{statistics.mean(bpbs):.3f} ({spread(gaps)})")
        speed = statistics.mean(t for s in STREAMS for _, t, _ in table[method, s])
        peak = max(p for s in STREAMS for _, _, p in table[method, s])
        print(f"{method:8} " + " ".join(f"{c:>24}" for c in cells)
              + f" {speed:7.0f} {(peak - lowest) / MIB:9.1f}")  # fmt: skip
    print(
        "bpb: the mean over seeds of the mean over chunks, each chunk scored before it is "
        "learned from; (vs base): minus that of reset (the base, no memory) on the same "
        "chunks, mean+-sd over seeds; tok/s: whole steps, learning included; extra MiB: peak "
        "MLX memory above the least of any method"
    )


if __name__ == "__main__":
    sys.exit(main())
