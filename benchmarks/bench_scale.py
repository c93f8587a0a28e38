"""What TTT promises, measured: time and memory linear/flat in the tokens seen, and a decode
step that does not grow with the context, beside causal softmax attention on MLX's CPU.

    python benchmarks/bench_scale.py           # 1k, 4k, 16k, 64k tokens; decode at 512 and 2048
    python benchmarks/bench_scale.py --quick   # a smoke run of a few seconds, no plot

Scale (B=1, hidden 512, head dim 64, K=16, float32): each layer's prefill (the whole sequence
in one call) and streaming (512-token chunks through its cache), time and peak memory. Peak
memory is MLX's peak above what was allocated before the call (parameters, input, a chunk): a
TTT layer's cache is its fast weights, of a fixed size, where attention's KV cache grows with
the tokens seen and its prefill holds an L x L score matrix per head.

Decode: per-token latency of `layer(x_t, cache=cache)`, p50 / p95 over four mini-batches of
tokens, with a context already in the cache. The KV cache is filled with random keys and
values, the TTT cache moved to that offset: no call's cost depends on the values, and a TTT
cache holds the same arrays whatever the number of tokens seen (only the offset modulo K
matters to its work).

The attention layer (defined here: RoPE, `mx.fast.scaled_dot_product_attention`, a KV cache
grown 256 tokens at a time as mlx-lm's) is bounded where it would not fit or finish: its
prefill runs while the score matrix stays under --attention-gib, its streaming up to
--attention-tokens (quadratic time); skipped cells say why. One timed call per cell after an
untimed one (which also compiles); --repeats takes the median of more. Re-executes itself once
with an optimized BLAS preloaded, as xltop starts a run. Draws the plot as SVG, and as PNG
beside it when rsvg-convert is installed.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_layers import cpu_name  # noqa: E402

from ttt_runtime.launch import run_environment  # noqa: E402

HEAD_DIM = 64
CHUNK = 512
MINI_BATCH = 16
DECODE_STEPS = 4 * MINI_BATCH  # p95 then falls on the steps that end a mini-batch
LAYERS = ("TTT-Linear", "TTT-MLP", "attention")
COLORS = {"TTT-Linear": "#1f77b4", "TTT-MLP": "#2ca02c", "attention": "#d62728"}
DEFAULT_PLOT = ROOT / "docs" / "img" / "scale.svg"
FULL = {"tokens": [1024, 4096, 16384, 65536], "hidden": 512, "decode_hidden": [512, 2048]}
QUICK = {"tokens": [128, 512], "hidden": 64, "decode_hidden": [64, 128]}


class KVCache:
    """Keys and values of the tokens seen, (B, heads, capacity, head_dim) buffers grown STEP
    tokens at a time (as mlx-lm's KVCache): a call writes its tokens into free room instead of
    concatenating the whole cache anew."""

    STEP = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update(self, keys, values):
        """Append this call's keys and values; returns all the keys and values so far."""
        import mlx.core as mx

        end = self.offset + keys.shape[2]
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if end > capacity:
            more = mx.zeros(
                (*keys.shape[:2], -(-end // self.STEP) * self.STEP - capacity, keys.shape[3])
            )
            self.keys, self.values = (
                more if old is None else mx.concatenate([old, more], axis=2)
                for old in (self.keys, self.values)
            )
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def state(self):
        return [self.keys, self.values]


def attention_layer(hidden: int):
    """Causal multi-head softmax attention with RoPE, sized as the TTT layers (q, k, v, o)."""
    import mlx.core as mx
    import mlx.nn as nn

    class CausalAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = hidden // HEAD_DIM
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
                nn.Linear(hidden, hidden, bias=False) for _ in range(4)
            )
            self.rope = nn.RoPE(HEAD_DIM, traditional=True)

        def make_cache(self, batch_size: int) -> KVCache:
            return KVCache()

        def __call__(self, x, cache: KVCache | None = None):
            B, L, _ = x.shape
            q, k, v = (
                proj(x).reshape(B, L, self.heads, HEAD_DIM).transpose(0, 2, 1, 3)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
            offset = cache.offset if cache else 0
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
            if cache is not None:
                k, v = cache.update(k, v)
            # "causal" aligns the queries with the last keys: a chunk sees the whole cache
            out = mx.fast.scaled_dot_product_attention(
                q, k, v, scale=HEAD_DIM**-0.5, mask="causal" if L > 1 else None
            )
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    return CausalAttention()


def make_layer(name: str, hidden: int):
    import mlx.core as mx

    from ttt_runtime.layers import TTTMLP, TTTLayerConfig, TTTLinear

    if name == "attention":
        layer = attention_layer(hidden)
    else:
        cfg = TTTLayerConfig(hidden, hidden // HEAD_DIM, mini_batch_size=MINI_BATCH)
        layer = {"TTT-Linear": TTTLinear, "TTT-MLP": TTTMLP}[name](cfg)
    mx.eval(layer.parameters())
    return layer


def measured(work) -> tuple[float, float]:
    """(seconds, peak MiB above the memory in use before) of work(), which evaluates itself."""
    import mlx.core as mx

    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    return seconds, (mx.get_peak_memory() - base) / 2**20


def prefill(layer, tokens: int, hidden: int):
    import mlx.core as mx

    x = mx.random.normal((1, tokens, hidden))
    mx.eval(x)
    return lambda: mx.eval(layer(x))


def stream(layer, tokens: int, hidden: int):
    """All the tokens through the layer's cache, CHUNK at a time (one chunk's values reused)."""
    import mlx.core as mx

    chunk = mx.random.normal((1, CHUNK, hidden))
    mx.eval(chunk)

    def work():
        cache = layer.make_cache(1)
        for start in range(0, tokens, CHUNK):
            mx.eval(layer(chunk[:, : tokens - start], cache=cache), cache.state)

    return work


def median_run(work, repeats: int) -> tuple[float, float]:
    """Median seconds and peak MiB of `repeats` timed calls, after an untimed one."""
    work()
    runs = [measured(work) for _ in range(repeats)]
    return statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs)


def attention_skip(mode: str, tokens: int, hidden: int, args) -> str | None:
    """Why attention is not run at this size (or None): the bounds of the module docstring."""
    scores_gib = hidden // HEAD_DIM * tokens**2 * 4 / 2**30
    if mode == "prefill" and scores_gib > args.attention_gib:
        return f"skipped: its scores alone would be {scores_gib:.3g} GiB (--attention-gib)"
    if mode == "stream" and tokens > args.attention_tokens:
        return f"skipped: over --attention-tokens {args.attention_tokens:,} (quadratic time)"
    return None


def scale(args) -> dict:
    """{layer: {tokens: {"prefill"/"stream": (seconds, MiB) or a skip reason}}}; the layers
    take turns at each size, so that a change in the machine's load falls on all of them."""
    layers = {name: make_layer(name, args.hidden) for name in LAYERS}
    results: dict = {name: {} for name in LAYERS}
    for tokens in args.tokens:
        for name, layer in layers.items():
            cells = results[name][tokens] = {}
            for mode, work in (("prefill", prefill), ("stream", stream)):
                skip = name == "attention" and attention_skip(mode, tokens, args.hidden, args)
                cells[mode] = skip or median_run(work(layer, tokens, args.hidden), args.repeats)
                done = cells[mode] if skip else "{:.3f} s, {:,.0f} MiB".format(*cells[mode])
                print(f"  {name} {mode}, {tokens:,} tokens: {done}", file=sys.stderr)
    return results


def filled_cache(layer, context: int):
    """The layer's cache as if `context` tokens had gone through it (see the module docstring)."""
    import mlx.core as mx

    cache = layer.make_cache(1)
    if isinstance(cache, KVCache):
        shape = (1, layer.heads, context, HEAD_DIM)
        mx.eval(cache.update(mx.random.normal(shape), mx.random.normal(shape)))
    else:
        cache.offset = context
    return cache


def decode(args) -> dict:
    """{(layer, hidden): {context: [ms per token]}}; the layers take turns token by token."""
    import mlx.core as mx

    results = {}
    for hidden in args.decode_hidden:
        layers = {name: make_layer(name, hidden) for name in LAYERS}
        x = mx.random.normal((1, 1, hidden))
        for context in args.tokens:
            caches = {name: filled_cache(layer, context) for name, layer in layers.items()}
            for step in range(MINI_BATCH + DECODE_STEPS):  # the first mini-batch compiles
                for name, layer in layers.items():
                    start = time.perf_counter()
                    mx.eval(layer(x, cache=caches[name]), caches[name].state)
                    if step >= MINI_BATCH:
                        ms = (time.perf_counter() - start) * 1e3
                        results.setdefault((name, hidden), {}).setdefault(context, []).append(ms)
            del caches  # before the next context's are filled: at 64k they are 1 GiB
            print(f"  decode, hidden {hidden}, {context:,} tokens: done", file=sys.stderr)
    return results


def p50_p95(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), statistics.quantiles(times, n=20)[18]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table, columns padded to their widest cell (the first left-aligned)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def scale_table(results: dict) -> str:
    """The table, then why each skipped cell was skipped."""
    rows, reasons = [], []
    for name in LAYERS:
        for tokens, cells in results[name].items():
            row = [name, f"{tokens:,}"]
            for mode in ("prefill", "stream"):
                cell = cells[mode]
                if isinstance(cell, str):
                    row += ["skipped", "", ""]
                    reasons.append(f"{name} {mode} at {tokens:,} tokens {cell}")
                else:
                    seconds, mib = cell
                    row += [f"{seconds:.3f}", f"{tokens / seconds:,.0f}", f"{mib:,.0f}"]
            rows.append(row)
    header = ["layer", "tokens", "prefill s", "tok/s", "peak MiB", "stream s", "tok/s", "peak MiB"]
    table = markdown(header, rows)
    return f"{table}\n\n" + "\n".join(reasons) if reasons else table


def decode_table(results: dict, contexts: list[int]) -> str:
    rows = [
        [name, str(hidden)] + ["{:.2f} / {:.2f}".format(*p50_p95(row[c])) for c in contexts]
        for (name, hidden), row in results.items()
    ]
    return markdown(["layer", "hidden", *(f"{c:,}" for c in contexts)], rows)


def summary(results: dict, decoded: dict, args) -> list[str]:
    """Time linear? memory flat? where does TTT overtake attention? From the measured cells."""
    lines = []
    first, last = args.tokens[0], args.tokens[-1]
    for name in LAYERS:
        measured_at = [t for t in args.tokens if not isinstance(results[name][t]["stream"], str)]
        if not measured_at:
            continue
        lo, hi = measured_at[0], measured_at[-1]
        (s_lo, m_lo), (s_hi, m_hi) = results[name][lo]["stream"], results[name][hi]["stream"]
        lines.append(
            f"{name} streaming: {lo / s_lo:,.0f} tok/s at {lo:,} tokens, {hi / s_hi:,.0f} at "
            f"{hi:,}; peak {m_lo:,.0f} MiB at {lo:,}, {m_hi:,.0f} MiB at {hi:,}"
        )
    for name in LAYERS[:2]:
        for mode in ("prefill", "stream"):
            lines.append(f"{name} {mode} beats attention: {crossover(results, name, mode)}")
        hidden = args.decode_hidden[0]
        times = {c: statistics.median(decoded[name, hidden][c]) for c in args.tokens}
        attention = {c: statistics.median(decoded["attention", hidden][c]) for c in args.tokens}
        faster = [c for c in args.tokens if times[c] < attention[c]]
        lines.append(
            f"{name} decode p50 at hidden {hidden}: {times[first]:.2f} ms at {first:,} tokens, "
            f"{times[last]:.2f} at {last:,} (attention {attention[first]:.2f} -> "
            f"{attention[last]:.2f}); faster than attention at: "
            + (", ".join(f"{c:,}" for c in faster) or "none")
        )
    return lines


def crossover(results: dict, name: str, mode: str) -> str:
    both = [
        t
        for t in results[name]
        if not isinstance(results["attention"][t][mode], str)
        and not isinstance(results[name][t][mode], str)
    ]
    if not both:
        return "not compared: attention was skipped at every length"
    faster = [t for t in both if results[name][t][mode][0] < results["attention"][t][mode][0]]
    if not faster:
        return f"no, slower at every length both ran ({', '.join(f'{t:,}' for t in both)})"
    if faster[0] == both[0]:
        return f"already at {both[0]:,} tokens, the shortest measured"
    return f"from {faster[0]:,} tokens on (slower at {max(t for t in both if t < faster[0]):,})"


def svg_plot(panels: list[tuple[str, dict]], path: Path) -> None:
    """Log-log line charts side by side: panels of (title, {label: [(x, y), ...]}); a label
    ending in ' prefill' is drawn dashed in its layer's colour."""
    width, height, left, top, bottom, right = 360, 280, 58, 34, 46, 22
    parts = []
    for index, (title, series) in enumerate(panels):
        ox = index * width
        points = [p for line in series.values() for p in line]
        xs = [math.log10(x) for x, _ in points]
        ys = [math.log10(y) for _, y in points]
        x_lo, x_hi = min(xs), max(xs)
        y_lo, y_hi = math.floor(min(ys)), math.ceil(max(ys))
        y_hi += y_hi == y_lo

        def to_px(x, y, x_lo=x_lo, x_hi=x_hi, y_lo=y_lo, y_hi=y_hi, ox=ox):
            u = (math.log10(x) - x_lo) / ((x_hi - x_lo) or 1)
            v = (math.log10(y) - y_lo) / (y_hi - y_lo)
            plot_w, plot_h = width - left - right, height - top - bottom
            return ox + left + u * plot_w, top + (1 - v) * plot_h

        parts.append(f'<text x="{ox + width / 2}" y="20" text-anchor="middle">{title}</text>')
        for decade in range(y_lo, y_hi + 1):
            _, y = to_px(10**x_lo, 10.0**decade)
            label = f"{10.0**decade:g}"
            parts.append(
                f'<line x1="{ox + left}" y1="{y:.1f}" x2="{ox + width - right}" y2="{y:.1f}" '
                f'stroke="#ddd"/><text x="{ox + left - 4}" y="{y + 4:.1f}" '
                f'text-anchor="end">{label}</text>'
            )
        for x_value in sorted({x for x, _ in points}):
            x, _ = to_px(x_value, 10.0**y_lo)
            label = f"{x_value // 1024}k" if x_value % 1024 == 0 else str(x_value)
            parts.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" '
                f'stroke="#ddd"/><text x="{x:.1f}" y="{height - bottom + 16}" '
                f'text-anchor="middle">{label}</text>'
            )
        parts.append(
            f'<text x="{ox + (width + left) / 2}" y="{height - 8}" text-anchor="middle">'
            "tokens</text>"
        )
        for row, (label, line) in enumerate(series.items()):
            layer = label.removesuffix(" prefill")
            dash = ' stroke-dasharray="6 4"' if label != layer else ""
            xy = " ".join("{:.1f},{:.1f}".format(*to_px(x, y)) for x, y in line)
            parts.append(
                f'<polyline points="{xy}" fill="none" stroke="{COLORS[layer]}" '
                f'stroke-width="2"{dash}/>'
            )
            if index == 0:  # the legend, once, in a row under the charts
                lx = left + row * 170
                parts.append(
                    f'<line x1="{lx}" y1="{height + 8}" x2="{lx + 22}" y2="{height + 8}" '
                    f'stroke="{COLORS[layer]}" stroke-width="2"{dash}/>'
                    f'<text x="{lx + 26}" y="{height + 12}">{label}</text>'
                )
    total, height = width * len(panels), height + 24
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height}" '
        f'font-family="sans-serif" font-size="11"><rect width="{total}" height="{height}" '
        f'fill="white"/>{"".join(parts)}</svg>\n'
    )
    if shutil.which("rsvg-convert"):
        png = path.with_suffix(".png")
        subprocess.run(["rsvg-convert", str(path), "-o", str(png)], check=True)


def plot(results: dict, decoded: dict, args, path: Path) -> None:
    def series(mode: str, value: int) -> dict:
        return {
            name: [(t, cells[mode][value]) for t, cells in results[name].items()
                   if not isinstance(cells[mode], str)]
            for name in LAYERS
        }  # fmt: skip

    hidden = args.decode_hidden[0]
    times = series("stream", 0)
    times.update({f"{k} prefill": v for k, v in series("prefill", 0).items()})
    panels = [
        (f"time, s ({CHUNK}-token chunks; dashed: one-call prefill)", times),
        ("peak memory streaming, MiB", series("stream", 1)),
        (
            f"decode ms/token (p50), hidden {hidden}, by context",
            {
                name: [(c, statistics.median(t)) for c, t in decoded[name, hidden].items()]
                for name in LAYERS
            },
        ),
    ]
    svg_plot(panels, path)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of tokens")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--tokens", type=positive, nargs="+", help="lengths and decode contexts")
    parser.add_argument("--hidden", type=int, help=f"scale's hidden size (head dim {HEAD_DIM})")
    parser.add_argument("--decode-hidden", type=int, nargs="+", help="decode's hidden sizes")
    parser.add_argument("--repeats", type=positive, default=1, help="timed calls a cell")
    parser.add_argument("--attention-gib", type=float, default=2.0, help="prefill bound")
    parser.add_argument("--attention-tokens", type=positive, default=16384, help="stream bound")
    parser.add_argument("--plot", type=Path, help=f"SVG path (default {DEFAULT_PLOT}; none quick)")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag, hidden in [("--hidden", args.hidden)] + [
        ("--decode-hidden", h) for h in args.decode_hidden
    ]:
        if hidden < HEAD_DIM or hidden % HEAD_DIM:
            parser.error(f"{flag} {hidden}: must be a multiple of the head dim, {HEAD_DIM}")
    if args.plot is None and not args.quick:
        args.plot = DEFAULT_PLOT
    if args.plot:  # found out now, not after the hour the benchmark can take
        folder = args.plot.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            parser.error(f"--plot {args.plot}: {folder} is not a folder")
        except OSError as exc:
            parser.error(f"--plot {args.plot}: {folder} cannot be made ({exc.strerror})")
        if not os.access(folder, os.W_OK):
            parser.error(f"--plot {args.plot}: {folder} is not writable")
    return args


def main() -> None:
    args = parse_args()
    if "TTT_BENCH_CHILD" not in os.environ:  # the BLAS is chosen at exec: preload it, once
        env = dict(run_environment(preload_blas=True), TTT_BENCH_CHILD="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import mlx.core as mx

    from ttt_runtime.blas import loaded_blas

    load_before = os.getloadavg()[0]
    started = time.monotonic()
    results = scale(args)
    decoded = decode(args)
    load_after = os.getloadavg()[0]
    heads = args.hidden // HEAD_DIM
    print(
        f"TTT vs causal softmax attention: B=1, hidden {args.hidden}, {heads} heads of "
        f"{HEAD_DIM}, K={MINI_BATCH}, float32, MLX {mx.__version__} CPU, BLAS {loaded_blas()}"
    )
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, load average {load_before:.2f} before "
        f"/ {load_after:.2f} after, {time.monotonic() - started:.0f} s in all\n"
    )
    print(f"Prefill (one call) and streaming ({CHUNK}-token chunks through the cache); peak MiB")
    print("is MLX's peak above the memory in use before the call.\n")
    print(scale_table(results))
    print(f"\nDecode: ms per token, p50 / p95 of {DECODE_STEPS} steps, by tokens already in the")
    print("cache.\n")
    print(decode_table(decoded, args.tokens))
    print()
    print("\n".join(summary(results, decoded, args)))
    if args.plot:
        plot(results, decoded, args, args.plot)
        print(f"\nplot: {args.plot} (and .png beside it where rsvg-convert is installed)")


if __name__ == "__main__":
    main()
