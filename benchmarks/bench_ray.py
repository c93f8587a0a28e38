"""What spreading a run over Ray actors costs, side by side in one run on one private local
cluster (tests/ray_helpers.LocalRayCluster, started once, stopped by its own process groups):

1. Steps/s of one process, 2 stages and 2 stages x 2 replicas: three real runs
   (`python -m ttt_runtime run [--ray ADDRESS ...]`), started paused, take turns (W windows of
   S seconds each, one run stepping at a time; medians). Per stage actor, from the telemetry's
   workers: ms computing (forward + backward), ms waiting for input, KiB sent and received.
2. Ms per stage hop for the default run's activations (float32 rows x seq_len x hidden_size):
   a driver -> A -> B -> driver round trip of identity actors, plain actor calls against a Ray
   Compiled Graph (`ray.dag.InputNode` + `experimental_compile`).
3. Averaging two replicas' real gradients (two `StageWorker`s in this process, each a whole
   model's stage on its own rows): per --grad-compression x --grad-average, the bytes a
   replica puts on the wire per step, the max and RMS error against the float64 mean (relative
   to the largest |g| sent and to the mean's RMS), ms to build the payload (quantize) and ms to
   average (`ray_workers._average`). Then the loss over the same steps (same seed, same data)
   of 2 x 2 runs with none, u16 exact and u8 swar gradients, and of one process (what float
   rounding alone moves).

    .venv/bin/python benchmarks/bench_ray.py [--preset tiny] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_monitor import median_ms  # noqa: E402
from ray_helpers import LocalRayCluster, ray_missing  # noqa: E402

from ttt_runtime.channel import ChannelClient, ChannelError  # noqa: E402
from ttt_runtime.config import RayConfig, RunConfig  # noqa: E402
from ttt_runtime.launch import RunProcess, spawn_run  # noqa: E402
from ttt_runtime.protocol import Telemetry  # noqa: E402

PLACEMENTS = {
    "1 process": [],
    "2 stages": ["--stages", "2"],
    "2 stages x 2 replicas": ["--stages", "2", "--replicas", "2"],
}
AVERAGINGS = [("none", "exact"), ("u16", "exact"), ("u8", "exact"), ("u16", "swar"),
              ("u8", "swar")]  # fmt: skip
# the loss runs: 1 process is the reference for what float rounding alone moves (2 x 2 with
# uncompressed gradients computes the same mean gradient, in another order)
LOSS_RUNS = {
    "1 process": [],
    "none exact": ["--grad-compression", "none"],
    "u16 exact": ["--grad-compression", "u16"],
    "u8 swar": ["--grad-compression", "u8", "--grad-average", "swar"],
}
START_TIMEOUT_S = 300.0  # a run starts Python, MLX and (Ray) its actors: slow on a loaded machine


# -- 1. steps/s -----------------------------------------------------------------------------------
class Recorder(ChannelClient):
    """A channel client that keeps every telemetry message, not only the newest."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.reports: list[Telemetry] = []
        super().__init__(*args, **kwargs)

    def _on_line(self, conn: Any, line: bytes | None) -> None:
        super()._on_line(conn, line)
        latest = self.latest()
        if latest is not None and (not self.reports or self.reports[-1] is not latest):
            self.reports.append(latest)


def start_run(args: list[str]) -> tuple[RunProcess, Recorder]:
    """A paused run and a recording client of its channel."""
    run = spawn_run([*args, "--start-paused", "true"])
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if run.poll() is not None:
            sys.exit(f"run {args} exited {run.poll()}: {run.stderr_tail()}")
        try:
            return run, Recorder.connect(run.socket_path)
        except ChannelError:
            if time.monotonic() > deadline:
                run.stop()
                sys.exit(f"run {args}: no channel after {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)


def wait_for(run: RunProcess, client: Recorder, done: Callable[[Telemetry], bool]) -> Telemetry:
    deadline = time.monotonic() + START_TIMEOUT_S
    while (report := client.latest()) is None or not done(report):
        if run.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"run exited ({run.poll()}) or stalled: {run.stderr_tail()}")
        time.sleep(0.05)
    return report


def window(run: RunProcess, client: Recorder, seconds: float, warm: int) -> list[Telemetry]:
    """Resume the run, skip `warm` steps, keep S seconds of reports (2 steps at least: a slow
    placement's rate needs them), pause it again."""
    assert client.request("resume").ok
    start = wait_for(run, client, lambda m: not m.paused).step
    first = wait_for(run, client, lambda m: m.step >= start + warm)
    time.sleep(seconds)
    last = wait_for(run, client, lambda m: m.step >= first.step + 2)
    assert client.request("pause", timeout=60).ok
    # one report per step (a paused run repeats its last one)
    steps = {m.step: m for m in client.reports if first.step <= m.step <= last.step}
    return list(steps.values())


def bench_steps(base: list[str], address: str, windows: int, seconds: float) -> None:
    runs = {}
    try:
        for name, extra in PLACEMENTS.items():
            ray = ["--ray", address, *extra] if extra else []
            runs[name] = start_run([*base, *ray])
        reports: dict[str, list[list[Telemetry]]] = {name: [] for name in runs}
        for turn in range(windows):  # the placements take turns: drift hits them all alike
            for name, (run, client) in runs.items():
                reports[name].append(window(run, client, seconds, warm=2 if turn == 0 else 1))
    finally:
        for run, client in runs.values():
            client.close()
            run.stop(timeout=30)
    print(f"\n1. Steps/s, {windows} windows of {seconds:g} s per placement taking turns, medians")
    print(f"  {'placement':<22}{'steps/s':>8}{'vs 1':>7}{'step ms':>9}")
    rates = {}
    for name, spans in reports.items():
        rates[name] = statistics.median(
            (s[-1].step - s[0].step) / (s[-1].t - s[0].t) for s in spans
        )
        step_ms = statistics.median(m.step_ms for s in spans for m in s if m.step_ms)
        print(f"  {name:<22}{rates[name]:8.2f}{rates[name] / rates['1 process']:7.2f}"
              f"{step_ms:9.1f}")  # fmt: skip
    print("  per stage actor, per step (medians over every step of the windows):")
    print(f"  {'placement':<22}{'stage':>6}{'rep':>4}{'fwd ms':>8}{'bwd ms':>8}{'wait ms':>8}"
          f"{'sent KiB':>10}{'recv KiB':>10}")  # fmt: skip
    for name, spans in reports.items():
        steps = [m for s in spans for m in s if m.workers]
        for i, worker in enumerate(steps[0].workers if steps else ()):
            rows = [m.workers[i] for m in steps]

            def med(field: str, rows=rows) -> float:
                return statistics.median(getattr(w, field) or 0.0 for w in rows)

            print(f"  {name:<22}{worker.stage:>6}{worker.replica:>4}{med('fwd_ms'):8.1f}"
                  f"{med('bwd_ms'):8.1f}{med('wait_ms'):8.1f}{med('sent') / 1024:10.1f}"
                  f"{med('received') / 1024:10.1f}")  # fmt: skip


# -- 2. a stage hop -------------------------------------------------------------------------------
class Hop:
    """A stage that only passes its input on: what a hop costs without the stage's work."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x


def bench_hops(sizes: dict[str, tuple[int, ...]], repeats: int) -> None:
    import ray
    from ray.dag import InputNode

    actor = ray.remote(Hop).options(num_cpus=0)
    a, b = actor.remote(), actor.remote()
    print(f"\n2. driver -> A -> B -> driver round trip (3 hops), median of {repeats} ms")
    print(f"  {'activation':<28}{'KiB':>6}{'plain calls':>13}{'compiled':>10}{'saved':>8}"
          f"{'per hop':>14}")  # fmt: skip
    for name, shape in sizes.items():
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)

        def plain(x=x) -> None:
            ray.get(b.forward.remote(a.forward.remote(x)))

        with InputNode() as source:
            graph = b.forward.bind(a.forward.bind(source))
        compiled = graph.experimental_compile(_buffer_size_bytes=2 * x.nbytes + 4096)

        def through_graph(x=x, compiled=compiled) -> None:
            ray.get(compiled.execute(x))

        try:
            for hop in (plain, through_graph):  # warm: the first calls set up the channels
                hop()
            plain_ms = median_ms(plain, repeats)
            compiled_ms = median_ms(through_graph, repeats)
        finally:
            compiled.teardown()
        saved = plain_ms - compiled_ms
        print(f"  {name:<28}{x.nbytes / 1024:6.0f}{plain_ms:13.2f}{compiled_ms:10.2f}"
              f"{saved:8.2f}{plain_ms / 3:6.2f} / {compiled_ms / 3:5.2f}")  # fmt: skip
    for handle in (a, b):
        ray.kill(handle)


# -- 3. averaging replicas' gradients ------------------------------------------------------------
def replica_gradients(config: RunConfig, compression: str, average: str) -> list[Any]:
    """Two `StageWorker`s (replicas of a one-stage model) that have run a train step's forward
    and backward on rows of their own (the same rows for every call: same seed, same data)."""
    from ttt_runtime.ray_workers import StageWorker

    placement = RayConfig("local", stages=1, replicas=2, micro_batches=1,
                          grad_compression=compression, grad_average=average)  # fmt: skip
    rows = config.batch_size // 2
    data = np.random.default_rng(config.seed).integers(0, 256, (2, rows, config.seq_len + 1))
    workers = []
    for replica in range(2):
        worker = StageWorker(config, placement, 0, replica, rows)
        tokens = data[replica].astype(np.int32)
        worker.forward(0, tokens[:, :-1], None, False)
        worker.backward(0, None, tokens[:, 1:])
        workers.append(worker)
    return workers


def averaging_figures(config: RunConfig, compression: str, average: str,
                      repeats: int) -> dict[str, float]:  # fmt: skip
    """Bytes per replica per step; the max error vs the float64 mean relative to the largest
    |g| either replica sends, the RMS error relative to the mean's RMS; ms to build a payload
    and ms to average two."""
    from ttt_runtime.ray_workers import _average, _payload_bytes

    workers = replica_gradients(config, compression, average)
    grads = [{k: np.array(v, np.float64) for k, v in w.stage.gradients().items()} for w in workers]
    ranges = [w.gradient_range() for w in workers] if average == "swar" else []
    payloads = tuple(w.gradient_payload(*ranges) for w in workers)
    mean = _average(payloads, average)
    errors, exact = [], []
    for name, value in mean.items():
        truth = (grads[0][name] + grads[1][name]) / 2
        errors.append((np.array(value, np.float64) - truth).ravel())
        exact.append(truth.ravel())
    error, truth = np.concatenate(errors), np.concatenate(exact)
    # what bounds a level's size: quantizing to [min, max] of a tensor, levels are <= 2 * this / 255
    largest = max(float(np.max(np.abs(g))) for replica in grads for g in replica.values())
    return {
        "bytes": sum(_payload_bytes(v) for v in payloads[0].values()),
        "max": float(np.max(np.abs(error)) / largest),
        "rms": float(np.sqrt(np.mean(error**2)) / np.sqrt(np.mean(truth**2))),
        "payload_ms": median_ms(lambda: workers[0].gradient_payload(*ranges), repeats),
        "average_ms": median_ms(lambda: _average(payloads, average), repeats),
    }


def bench_averaging(config: RunConfig, repeats: int) -> None:
    figures = {key: averaging_figures(config, *key, repeats) for key in AVERAGINGS}
    plain = figures[("none", "exact")]["bytes"]
    print(f"\n3. Averaging 2 replicas' gradients ({config.preset} model, "
          f"{plain // 4:,} parameters; median of {repeats}); errors vs the float64 mean: max "
          "over the largest |g| sent, RMS over the mean's RMS")  # fmt: skip
    print(f"  {'compression':<12}{'average':<8}{'KiB/replica':>12}{'vs none':>8}{'max err':>10}"
          f"{'RMS err':>10}{'payload ms':>11}{'average ms':>11}")  # fmt: skip
    for (compression, average), f in figures.items():
        print(f"  {compression:<12}{average:<8}{f['bytes'] / 1024:12.1f}{f['bytes'] / plain:8.3f}"
              f"{f['max']:10.2e}{f['rms']:10.2e}{f['payload_ms']:11.2f}"
              f"{f['average_ms']:11.2f}")  # fmt: skip


def bench_loss(base: list[str], address: str, steps: int) -> None:
    """2 x 2 runs and one process, side by side from the same start: the loss at every 10th
    step and the mean of the last 10."""
    runs = {}
    try:
        for name, gradients in LOSS_RUNS.items():
            ray = ["--ray", address, "--stages", "2", "--replicas", "2"] if gradients else []
            runs[name] = start_run(
                [*base, *ray, *gradients, "--max-steps", str(steps), "--sample-every", "0"]
            )
        for _, client in runs.values():
            assert client.request("resume").ok
        failed = {}
        for name, (run, _) in runs.items():
            if run.wait(START_TIMEOUT_S + 10 * steps) != 0:
                failed[name] = run.stderr_tail().strip().splitlines()[-1:]
    finally:
        for run, client in runs.values():
            client.close()
            run.stop(timeout=30)
    curves = {name: {m.step: m.loss_bpb for m in client.reports if m.loss_bpb is not None}
              for name, (_, client) in runs.items()}  # fmt: skip
    marks = [s for s in range(10, steps + 1, 10)] or [steps]
    print(f"\n   loss (bits per byte) of 2 stages x 2 replicas by gradients on the wire, and of "
          f"1 process; same seed and data, {steps} steps")  # fmt: skip
    print(f"  {'run':<12}" + "".join(f"{f'step {s}':>9}" for s in marks)
          + f"{'last 10':>9}{'vs none':>9}")  # fmt: skip
    tails = {name: statistics.mean(curve[s] for s in range(steps - 9, steps + 1) if s in curve)
             for name, curve in curves.items() if name not in failed}  # fmt: skip
    for name, curve in curves.items():
        if name in failed:
            print(f"  {name:<12}failed: {' '.join(failed[name])[:200]}")
            continue
        cells = "".join(f"{curve.get(s, float('nan')):9.3f}" for s in marks)
        versus = tails[name] - tails.get("none exact", float("nan"))
        print(f"  {name:<12}{cells}{tails[name]:9.3f}{versus:+9.3f}")


# -- the whole benchmark --------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", help="the runs' model (default: default)")
    parser.add_argument("--quick", action="store_true", help="fewer windows, repeats and steps")
    args = parser.parse_args()
    if reason := ray_missing():
        print(f"skipped: {reason}")  # Ray is an optional extra: not a failed benchmark
        return
    windows, seconds, repeats, steps = (2, 3.0, 20, 20) if args.quick else (3, 6.0, 100, 50)
    config = RunConfig.from_preset(args.preset)
    # 2 replicas take a row each at least (the tiny preset has a batch of 1)
    config = config.with_overrides(batch_size=max(2, config.batch_size))
    base = ["--preset", args.preset, "--batch-size", str(config.batch_size)]
    load = os.getloadavg()[0]
    print(f"machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total >> 30} GiB, "
          f"load average {load:.1f}; preset {args.preset}: {config.num_blocks} blocks, hidden "
          f"{config.hidden_size}, batch {config.batch_size} x {config.seq_len} bytes")  # fmt: skip
    cluster = LocalRayCluster()
    try:
        cluster.start_head()
        # the cluster's HOME and Ray settings for the runs and this driver; not its TMPDIR,
        # under which MLX failed to load some compiled kernels (as tests/ttt_runtime/test_ray_run)
        for name in [n for n in os.environ if n.startswith("RAY_")]:
            del os.environ[name]
        os.environ.update({k: v for k, v in cluster.env().items() if k != "TMPDIR"})
        bench_steps(base, cluster.gcs_address, windows, seconds)
        import ray

        ray.init(address=cluster.gcs_address, log_to_driver=False, configure_logging=False)
        try:
            micro = config.batch_size // min(2, config.batch_size)
            bench_hops({
                f"micro-batch {micro} x {config.seq_len} x {config.hidden_size}":
                    (micro, config.seq_len, config.hidden_size),
                f"batch {config.batch_size} x {config.seq_len} x {config.hidden_size}":
                    (config.batch_size, config.seq_len, config.hidden_size),
                "256 KiB (the issue's figure)": (64 * 1024,),
            }, repeats)  # fmt: skip
        finally:
            ray.shutdown()
        bench_averaging(config, repeats=5)  # an exact average of the default model takes seconds
        bench_loss(base, cluster.gcs_address, steps)
    finally:
        cluster.stop()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
