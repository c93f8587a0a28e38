"""A run spread over Ray actors, on a real local cluster on 127.0.0.1 (one head for the module):
its workers reported, commands fanned out, checkpoints that any placement resumes, a killed
actor restarted and the run taken back to its safe point (the same weights as a run never
interrupted), restarts used up, an address nobody answers, and SIGTERM leaving nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import psutil
import pytest
from polling import run_client, wait_until
from ray_helpers import LocalRayCluster, free_port, ray_missing

from ttt_runtime.checkpoint import load

pytestmark = pytest.mark.slow
TINY_4 = ("--preset", "tiny", "--num-blocks", "4", "--batch-size", "2", "--sample-every", "3")


@pytest.fixture(scope="module")
def ray_head():
    if reason := ray_missing():
        pytest.skip(reason)
    cluster = LocalRayCluster()
    try:
        cluster.start_head()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ray_run(ray_head, spawned_run, monkeypatch):
    """Factory: a `spawned_run` that is the driver of a run on the module's cluster."""
    for name in [n for n in os.environ if n.startswith("RAY_")]:
        monkeypatch.delenv(name)
    # the cluster's HOME and Ray settings, not its TMPDIR: MLX compiles kernels under TMPDIR,
    # and in a fresh one some (long-named) kernels failed to load (MLX 0.32, CPU)
    for name, value in ray_head.env().items():
        if name != "TMPDIR":
            monkeypatch.setenv(name, value)

    def start(*args: str):
        return spawned_run(*TINY_4, "--ray", ray_head.gcs_address, *args)

    return start


def telemetry_where(run, client, predicate, timeout=120.0, what="telemetry"):
    """The first telemetry of `run` that satisfies `predicate`; fails at once if the run exits."""

    def found():
        assert run.poll() is None, f"run exited {run.poll()}: {run.stderr_tail()}"
        return (m := client.latest()) is not None and predicate(m) and m

    return wait_until(found, timeout, what)


def test_a_two_stage_run_reports_its_workers_and_obeys_every_command(ray_run, tmp_path):
    run = ray_run("--stages", "2")
    client = run_client(run, 120.0)
    first = telemetry_where(run, client, lambda m: m.step >= 4 and m.sampled_step, what="step 4")
    assert [(w.stage, w.replica, w.blocks) for w in first.workers] == [
        (0, 0, (0, 1)),
        (1, 0, (2, 3)),
    ]
    for worker in first.workers:
        assert psutil.pid_exists(worker.pid) and worker.pid != run.pid
        assert worker.node_id and worker.node_ip != "?" and worker.rss > 0 and worker.peak > 0
        assert worker.fwd_ms > 0 and worker.bwd_ms > 0 and worker.sent > 0 and worker.received > 0
    assert len(first.blocks) == 4 and all(b.bwd_ms for b in first.blocks)
    assert len(first.layers) == 4 and first.loss_bpb > 0

    assert client.request("pause").ok
    paused = client.latest().step
    time.sleep(1.0)
    assert client.latest().step == paused and client.latest().paused
    reply = client.request("clear_cache")
    assert reply.ok and reply.extras["cache"] >= 0
    assert client.request("reset").ok
    saved = client.request("save", path=str(tmp_path / "two.safetensors"))
    assert saved.ok, saved.error
    checkpoint = load(saved.extras["path"])
    assert checkpoint.step == paused
    assert {k.split(".")[2] for k in checkpoint.arrays if k.startswith("model.blocks.")} == {
        "0", "1", "2", "3"
    }  # fmt: skip
    assert client.request("resume").ok
    telemetry_where(run, client, lambda m: m.step > paused, what="steps after resume")


def test_a_checkpoint_moves_between_one_process_two_and_four_stages(ray_run, spawned_run, tmp_path):
    """Each run resumes the last one's checkpoint at its step, with identical weights."""
    path = str(tmp_path / "one.safetensors")
    one = spawned_run(*TINY_4)
    client = run_client(one, 60.0)
    telemetry_where(one, client, lambda m: m.step >= 3)
    assert client.request("pause").ok
    assert client.request("save", path=path).ok
    for stages in ("2", "4", None):
        before = load(path)
        step = before.step
        run = (
            ray_run("--stages", stages, "--resume", path, "--start-paused", "true")
            if stages
            else spawned_run("--resume", path, "--start-paused", "true")
        )
        client = run_client(run, 120.0)
        telemetry_where(run, client, lambda m, step=step: m.step == step, what="the resumed step")
        path = str(tmp_path / f"from-{stages or 'one'}.safetensors")
        assert client.request("save", path=path).ok
        after = load(path)
        assert after.arrays.keys() == before.arrays.keys(), stages
        for name, value in before.arrays.items():
            assert mx.array_equal(after.arrays[name], value), (stages, name)
        assert client.request("stop").ok
        assert run.wait(60) == 0


def safe_points(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("safe-step-*.safetensors"))


def test_a_killed_stage_is_restarted_and_the_run_ends_where_an_uninterrupted_one_does(
    ray_run, tmp_path
):
    common = ("--stages", "2", "--micro-batches", "1", "--checkpoint-every", "4",
              "--checkpoint-to-disk", "true", "--max-steps", "12")  # fmt: skip
    killed_dir, whole_dir = tmp_path / "killed", tmp_path / "whole"
    run = ray_run(*common, "--checkpoint-dir", str(killed_dir))
    client = run_client(run, 120.0)
    before = telemetry_where(run, client, lambda m: m.step >= 5, what="step 5")
    victim = before.workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    after = telemetry_where(
        run, client, lambda m: m.workers and m.workers[1].restarts == 1, what="the restart"
    )
    assert after.workers[1].pid != victim.pid and after.workers[0].restarts == 0
    assert "stage 1 replica 0" in run.stderr_tail() and "back to step 4" in run.stderr_tail()
    assert run.wait(120) == 0
    whole = ray_run(*common, "--checkpoint-dir", str(whole_dir))
    assert whole.wait(180) == 0
    assert safe_points(killed_dir) == safe_points(whole_dir) == ["safe-step-12.safetensors"]
    a, b = (load(str(d / "safe-step-12.safetensors")) for d in (killed_dir, whole_dir))
    assert a.stream_position == b.stream_position and a.tokens == b.tokens
    for name, value in b.arrays.items():
        assert mx.array_equal(a.arrays[name], value), name


def test_a_stage_that_cannot_come_back_stops_the_run_with_one_line(ray_run):
    run = ray_run("--stages", "2", "--max-restarts", "0")
    client = run_client(run, 120.0)
    victim = telemetry_where(run, client, lambda m: m.step >= 2).workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    assert run.wait(120) == 1
    line = (
        f"stage 0 replica 0 (pid {victim.pid} on node {victim.node_ip}) died and cannot come back"
    )
    assert line in run.stderr_tail()
    assert "Traceback" not in run.stderr_tail()


def test_an_address_nobody_answers_fails_in_seconds_with_one_line():
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "ttt_runtime", "run", "--preset", "tiny",
         "--ray", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert time.monotonic() - start < 15
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:" in lines[0], lines


def test_sigterm_stops_a_private_local_cluster_and_leaves_nothing(spawned_run, monkeypatch):
    if reason := ray_missing():
        pytest.skip(reason)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    before = {p for p in os.listdir("/tmp") if p.startswith("xr-")}
    run = spawned_run("--ray", "local", "--stages", "2")
    client = run_client(run, 180.0)
    telemetry_where(run, client, lambda m: m.step >= 2 and m.workers)
    family = psutil.Process(run.pid).children(recursive=True)
    assert len(family) > 3  # Ray's own processes and the two actors
    temp = {p for p in os.listdir("/tmp") if p.startswith("xr-")} - before
    assert len(temp) == 1
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait(60) == 0
    gone = wait_until(lambda: not any(p.is_running() for p in family), 30, "Ray's processes")
    assert gone and not os.path.exists(os.path.join("/tmp", temp.pop()))
