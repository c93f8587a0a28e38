"""A run spread over Ray actors, on a real local cluster on 127.0.0.1 (one head for the module):
its workers reported, commands fanned out, checkpoints that any placement resumes, a killed
actor restarted and the run taken back to its safe point (the same weights as a run never
interrupted), restarts used up, an address nobody answers, and SIGTERM leaving nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import mlx.core as mx
import psutil
import pytest
from polling import run_client, wait_until
from ray_helpers import LocalRayCluster, free_port, ray_missing

from ttt_runtime.checkpoint import load
from xltop.raycluster import RayCluster

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
    assert_xltop_joins_the_workers_to_their_actors(run.socket_path, first.workers)

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


def assert_xltop_joins_the_workers_to_their_actors(socket_path: str, workers) -> None:
    """The real xltop attached to the run finds the run's cluster (from its hello) and shows
    each stage actor with the run's figures of it, in JSON that keeps the schema."""
    schema = json.loads((Path(__file__).parents[1] / "xltop" / "snapshot_schema.json").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "xltop", "--attach", socket_path, "--json-stream", "--count", "20",
         "--interval", "1"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    snapshots = [json.loads(line) for line in done.stdout.splitlines()]
    for snapshot in snapshots:
        jsonschema.validate(snapshot, schema)
    joined = [
        {(a["worker"]["stage"], a["pid"]) for a in s["ray"]["actors"] if a["worker"]}
        for s in snapshots
        if s["ray"] is not None
    ]
    assert {(w.stage, w.pid) for w in workers} in joined, joined[-3:]


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


@pytest.mark.parametrize("command", ["clear_cache", "save"])  # save gathers a checkpoint
def test_a_stage_killed_while_paused_fails_the_next_command_and_the_run_goes_back(
    ray_run, tmp_path, command
):
    # a call outside a step (a command, the periodic checkpoint) met the dead actor's error
    # unhandled: a traceback and exit 1 instead of the restart a step gets
    run = ray_run("--stages", "2", "--checkpoint-every", "2")
    client = run_client(run, 120.0)
    telemetry_where(run, client, lambda m: m.step >= 3 and m.workers, what="step 3")
    assert client.request("pause").ok
    victim = client.latest().workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    args = {"path": str(tmp_path / "x.safetensors")} if command == "save" else {}
    reply = client.request(command, **args)
    assert not reply.ok and "stage 1 replica 0" in reply.error and "died" in reply.error
    assert "back to step" in run.stderr_tail() and "Traceback" not in run.stderr_tail()
    assert client.request("resume").ok
    after = telemetry_where(run, client, lambda m: m.workers[1].restarts == 1 and m.step >= 4)
    assert after.workers[1].pid != victim.pid


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


HTTP_400 = b"HTTP/1.0 400 Bad Request\r\n\r\n"


@pytest.mark.parametrize(
    "host, answer, reason",
    [
        ("127.0.0.1", None, "no answer in 10 s"),
        ("127.0.0.1", HTTP_400, "answers, but not as a Ray cluster"),
        # [::1]:PORT: the brackets reached the resolver ("Name or service not known")
        ("::1", HTTP_400, "answers, but not as a Ray cluster"),
    ],
    ids=["silent", "http", "http-ipv6"],
)
def test_a_port_that_is_not_a_ray_cluster_is_named_in_seconds(host, answer, reason):
    # Ray's own connect waited out INIT_TIMEOUT_S (60 s) on either, then exit 1 under a few of
    # its C++ warnings; a GCS answers an HTTP/2 preface at once (a dashboard's port, HTTP)
    ipv6 = ":" in host
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET) as server:
        server.bind((host, 0))
        server.listen(8)
        if answer is not None:

            def answer_each():
                with contextlib.suppress(OSError):
                    while True:
                        conn, _ = server.accept()
                        conn.recv(1024)
                        conn.sendall(answer)
                        conn.close()

            threading.Thread(target=answer_each, daemon=True).start()
        port = server.getsockname()[1]
        address = f"[{host}]:{port}" if ipv6 else f"{host}:{port}"
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "ttt_runtime", "run", "--preset", "tiny", "--ray", address],
            capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert time.monotonic() - start < 25  # 10 s, and a loaded machine's imports
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ttt-run: error: cannot reach the Ray cluster at {address}: ")
    assert reason in lines[0]


def test_sigterm_stops_a_private_local_cluster_and_leaves_nothing(spawned_run, monkeypatch):
    if reason := ray_missing():
        pytest.skip(reason)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run = spawned_run("--ray", "local", "--stages", "2")
    client = run_client(run, 180.0)
    telemetry_where(run, client, lambda m: m.step >= 2 and m.workers)
    family = psutil.Process(run.pid).children(recursive=True)
    assert len(family) > 3  # Ray's own processes and the two actors
    # the private cluster's temp dir, as its processes were told it
    (temp,) = {m[0] for p in family for m in re.finditer(r"/tmp/xr-[a-z0-9_]+", " ".join(
        p.cmdline()))}  # fmt: skip
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait(60) == 0
    gone = wait_until(lambda: not any(p.is_running() for p in family), 30, "Ray's processes")
    assert gone and not os.path.exists(temp)


@pytest.mark.parametrize(
    "signum, started",
    [(signal.SIGTERM, "gcs_server"), (signal.SIGTERM, "raylet"), (signal.SIGINT, "gcs_server")],
)
def test_a_stop_signal_amid_ray_init_stops_the_private_cluster_and_leaves_nothing(
    spawned_run, monkeypatch, signum, started
):
    # ray.init puts in a SIGTERM handler of its own (sys.exit(15): the private cluster and its
    # /tmp/xr-* were left), then its core worker one that aborts (SIGABRT and a C++ backtrace)
    if reason := ray_missing():
        pytest.skip(reason)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run = spawned_run("--ray", "local", "--stages", "2")
    process = psutil.Process(run.pid)

    def ray_process_started():
        assert run.poll() is None, run.stderr_tail()
        return any(p.name() == started for p in process.children(recursive=True))

    wait_until(ray_process_started, 120, started)
    family = process.children(recursive=True)
    (temp,) = {m[0] for p in family for m in re.finditer(r"/tmp/xr-[a-z0-9_]+", " ".join(
        p.cmdline()))}  # fmt: skip
    os.kill(run.pid, signum)
    try:
        assert run.wait(60) == 0, run.stderr_tail()
        wait_until(lambda: not any(p.is_running() for p in family), 30, "Ray's processes")
        assert not os.path.exists(temp)
        assert "SIGTERM received" not in run.stderr_tail()
    finally:
        for leftover in family:
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def test_replicas_average_compressed_gradients_and_report_every_actor(ray_run):
    run = ray_run("--stages", "2", "--replicas", "2", "--grad-compression", "u8",
                  "--grad-average", "swar")  # fmt: skip
    client = run_client(run, 120.0)
    report = telemetry_where(run, client, lambda m: m.step >= 4, what="step 4")
    assert sorted((w.stage, w.replica) for w in report.workers) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({w.pid for w in report.workers}) == 4
    assert all(w.sent > 0 and w.received > 0 for w in report.workers)
    assert report.loss_bpb is not None and 0 < report.loss_bpb < 9


def test_on_a_two_node_cluster_each_worker_reports_the_node_it_runs_on(ray_head, ray_run):
    """Ray places the actors (SPREAD, best effort: both stages sometimes land on one node of
    two); each worker's reported node is one the cluster lists alive."""
    node = ray_head.add_node()  # a second raylet on this machine: a real second node
    watcher = RayCluster(ray_head.url, None, interval=0.5)
    try:
        nodes = wait_until(
            lambda: (state := watcher.sample()).nodes_alive == 2 and state.nodes,
            60, "the second node alive",
        )  # fmt: skip
        alive = {n.node_id: n.ip for n in nodes if n.alive}
        run = ray_run("--stages", "2")
        client = run_client(run, 120.0)
        report = telemetry_where(run, client, lambda m: m.step >= 2, what="step 2")
        assert all(alive.get(w.node_id) == w.node_ip for w in report.workers), report.workers
        assert run.stop() == 0
    finally:
        watcher.close()
        LocalRayCluster.stop_group(node)


def test_a_cluster_with_token_auth_takes_the_token_and_refuses_a_run_without_it(
    spawned_run, monkeypatch
):
    if reason := ray_missing():
        pytest.skip(reason)
    cluster = LocalRayCluster(token="0123456789abcdef0123456789abcdef")
    try:
        cluster.start_head()
        env = cluster.env()
        for name in ("HOME", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.setenv(name, env[name])
        run = spawned_run(*TINY_4, "--ray", cluster.gcs_address, "--stages", "2")
        client = run_client(run, 120.0)
        telemetry_where(run, client, lambda m: m.step >= 2 and m.workers, what="step 2")
        assert run.stop() == 0
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
        done = subprocess.run(
            [sys.executable, "-m", "ttt_runtime", "run", *TINY_4, "--ray", cluster.gcs_address],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("ttt-run: error: cannot join the Ray cluster:"), lines
    finally:
        cluster.stop()


def test_an_adapt_run_carries_each_stages_fast_weights_from_chunk_to_chunk(ray_run):
    run = ray_run("--mode", "adapt", "--stages", "2", "--sample-every", "2")
    client = run_client(run, 120.0)
    report = telemetry_where(
        run, client, lambda m: m.step >= 5 and m.sampled_step and m.sampled_step >= 4,
        what="a sampled step after the first chunks",
    )  # fmt: skip
    assert [w.bwd_ms for w in report.workers] == [None, None]  # no backward in adapt mode
    assert len(report.layers) == 4 and all(layer.drift > 0 for layer in report.layers)
    assert client.request("reset").ok
    reset = telemetry_where(run, client, lambda m: m.conversation == 1, what="the reset")
    assert all(layer.drift == 0 for layer in reset.layers)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--ray", "foo"], "ray='foo': must be 'local' or a cluster's host:port"),
        (["--ray", "local", "--stages", "5"], "stages=5: at most num_blocks=4"),
        (["--ray", "local", "--replicas", "3"], "replicas=3: must divide batch_size=2"),
        (["--ray", "local", "--grad-average", "swar", "--grad-compression", "none"],
         "grad_average='swar': needs grad_compression 'u8' or 'u16'"),
        (["--stages", "2"], "--stages: needs --ray"),
        (["--ray", "local", "--max-restarts", "-1"], "max_restarts=-1: must be an integer"),
    ],
)  # fmt: skip
def test_a_placement_that_cannot_be_is_one_line_before_anything_starts(flags, message):
    done = subprocess.run(
        [sys.executable, "-m", "ttt_runtime", "run", *TINY_4, *flags],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert (
        done.returncode == 2
        and done.stderr
        == f"ttt-run: error: {message}" + (done.stderr[len(f"ttt-run: error: {message}") :])
    )
    assert len(done.stderr.strip().splitlines()) == 1


def test_without_ray_installed_a_ray_run_says_how_to_get_it(tmp_path):
    script = (
        "import sys; sys.modules['ray'] = None\n"  # the import of ray fails, as if not installed
        "from ttt_runtime.__main__ import main\n"
        f"sys.exit(main(['--preset', 'tiny', '--ray', 'local', '--socket', '{tmp_path}/r.sock']))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "ttt-run: error: --ray needs Ray: pip install 'xltop[ray]'"
