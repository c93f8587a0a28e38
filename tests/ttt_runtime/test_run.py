"""The TTT run as a real child process (tiny preset), steered over its real channel."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest
from polling import run_client, wait_until
from test_checkpoint import change_a_digit, crafted, unwritable_targets

from ttt_runtime.blas import find_blas_preload
from ttt_runtime.channel import ChannelClient, ChannelError
from ttt_runtime.protocol import Reply, Telemetry, decode_message, encode
from ttt_runtime.run import PROGRESS_S

READY_S = 90.0  # importing MLX and compiling on a loaded 2-core machine
pytestmark = pytest.mark.slow


def connect(run, timeout=READY_S) -> ChannelClient:
    """Connect once the run listens; fail early (with its stderr) if it dies first."""
    return run_client(run, timeout)


def report(client, predicate=lambda m: True, timeout=READY_S, what="report"):
    """The first telemetry message (from now on) that satisfies `predicate`."""
    return wait_until(
        lambda: (m := client.latest()) is not None and predicate(m) and m, timeout, what
    )


def report_after(client, moment: float, predicate=lambda m: True, timeout=30.0):
    return report(client, lambda m: m.t > moment and predicate(m), timeout)


@pytest.fixture
def clients():
    opened: list[ChannelClient] = []

    def open_(run):
        client = connect(run)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        client.close()


def test_steps_advance_with_every_telemetry_field(spawned_run, clients):
    run = spawned_run()
    first, second = clients(run), clients(run)  # several monitors may watch one run
    message = report(first, lambda m: m.step >= 3 and m.sampled_step is not None)
    assert message.mode == "train" and message.preset == "tiny"
    assert message.tokens == message.step * 32  # tiny: seq_len 32, batch 1
    assert message.sampled_step == 2 or message.sampled_step % 5 == 0  # 1: the warm-up
    assert len(message.blocks) == 2 and len(message.layers) == 2
    assert all(b.fwd_ms > 0 and b.bwd_ms > 0 for b in message.blocks)
    assert message.warmup_ms > 0
    for layer in message.layers:
        assert layer.w_norm > 0 and layer.inner_loss_before is not None
        assert layer.exact_drift is None
    assert message.mlx.active > 0 and message.mlx.backend in ("cpu", "gpu", "cuda")
    assert message.mlx.device and message.mlx.memory_size > 0
    assert message.blas == ("openblas" if find_blas_preload() else "bundled")
    later = report(second, lambda m: m.step > message.step + 5)
    assert later.tokens > message.tokens


def messages_until(raw: socket.socket, enough) -> list:
    """Every message read from a raw connection to a run, until `enough(messages)`."""
    messages, buffer = [], b""
    while not enough(messages):
        data = raw.recv(65536)
        assert data, "the run closed the connection"
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        messages += map(decode_message, filter(None, lines))
    return messages


def every_report(run, clients, until) -> list[Telemetry]:
    """Every telemetry message of a run started paused, from its first step on, until one
    satisfies `until`."""
    clients(run)  # waits until the run listens
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(READY_S)
    raw.connect(run.socket_path)
    raw.sendall(encode({"cmd": "resume", "id": 1}))
    try:
        messages = messages_until(
            raw, lambda ms: ms and isinstance(ms[-1], Telemetry) and ms[-1].step and until(ms[-1])
        )
    finally:
        raw.close()
    return [m for m in messages if isinstance(m, Telemetry) and m.step >= 1]


def test_the_warm_up_is_one_figure_and_stays_out_of_the_step_and_block_times(spawned_run, clients):
    # the case: the mlp preset's sampled adapt path compiles for seconds in block 0
    run = spawned_run("--preset", "mlp", "--mode", "adapt", "--start-paused", "true")
    reports = every_report(run, clients, lambda m: m.sampled_step is not None)
    warm_up, sampled = reports[0], reports[-1]
    assert warm_up.step == 1 and warm_up.warmup_ms > 0
    assert warm_up.step_ms is None and warm_up.tokens_per_s is None
    assert {m.warmup_ms for m in reports} == {warm_up.warmup_ms}  # one figure, kept
    assert sampled.sampled_step == 2  # the first step after the warm-up
    assert sampled.warmup_ms > sampled.step_ms > 0
    fwd = [b.fwd_ms for b in sampled.blocks]
    assert max(fwd) < 4 * min(fwd), fwd  # same work per block: none carries a compile


def test_every_block_of_a_sampled_train_step_reports_forward_and_backward_time(
    spawned_run, clients
):
    run = spawned_run("--layer-type", "mlp", "--sample-every", "1", "--start-paused", "true")
    reports = every_report(run, clients, lambda m: m.step >= 30)
    sampled = [m for m in reports if m.sampled_step == m.step]
    assert len(sampled) >= 20
    for message in sampled:
        blocks = message.blocks
        assert all(b.fwd_ms > 0 and b.bwd_ms > 0 for b in blocks), message.step


@pytest.mark.parametrize(
    "overrides", [{"mode": "train"}, {"mode": "adapt", "exact_accumulate": True}]
)
def test_the_warm_up_changes_no_update(tmp_path, overrides):
    """The warm-up step updates exactly as in a run that never samples: the sampled path is
    warmed on a throwaway."""
    import mlx.core as mx

    from ttt_runtime.config import RunConfig
    from ttt_runtime.run import TTTRun

    def updated(run) -> list:
        return sorted(run.learner.state().arrays.items())

    config = RunConfig.from_preset("tiny").with_overrides(**overrides)
    runs = [
        TTTRun(config.with_overrides(sample_every=every), str(tmp_path / f"{every}.sock"))
        for every in (1, 0)
    ]
    try:
        for run in runs:
            run.run_step()
            assert run.warmup_ms > 0
        sampling, plain = (updated(run) for run in runs)
        assert len(sampling) == len(plain) > 0
        for (name, a), (_, b) in zip(sampling, plain, strict=True):
            assert mx.array_equal(a, b).item(), name
    finally:
        for run in runs:
            run.close()


def test_without_preload_the_bundled_blas_is_reported(spawned_run, clients):
    client = clients(spawned_run(preload_blas=False))
    assert report(client).blas in ("bundled", "accelerate")


def test_pause_stops_steps_and_resume_restarts_them(spawned_run, clients):
    client = clients(spawned_run())
    report(client, lambda m: m.step >= 2)
    assert client.request("pause").ok
    paused = report(client, lambda m: m.paused)
    time.sleep(1.5)  # a tiny step takes milliseconds: a paused run would have made hundreds
    still = client.latest()
    assert still.paused and still.step == paused.step
    assert client.request("resume").ok
    report(client, lambda m: not m.paused and m.step > paused.step + 3)


def test_clear_cache_drops_the_reported_cache(spawned_run, clients):
    client = clients(spawned_run())
    report(client, lambda m: m.mlx.cache > 0, what="a non-empty MLX cache")
    assert client.request("pause").ok
    before = report(client, lambda m: m.paused).mlx.cache
    moment = time.time()
    reply = client.request("clear_cache")
    after = report_after(client, moment).mlx.cache
    assert reply.ok and reply.extras["cache"] == after
    assert before > 0 and after <= before // 10


def test_reset_brings_drift_back_to_zero(spawned_run, clients):
    client = clients(spawned_run("--mode", "adapt"))
    drifted = report(client, lambda m: m.step > 5 and m.layers
                     and all(x.drift > 0 for x in m.layers))  # fmt: skip
    assert client.request("pause").ok
    moment = time.time()
    reply = client.request("reset")
    assert reply.ok and reply.extras["conversation"] == drifted.conversation + 1
    reset = report_after(client, moment)
    assert reset.conversation == reply.extras["conversation"]
    assert [x.drift for x in reset.layers] == [0.0, 0.0]
    assert client.request("resume").ok
    report(client, lambda m: m.sampled_step > reset.step and m.layers[0].drift > 0)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_exact_accumulation_reports_the_float32_error(spawned_run, clients, layer_type):
    run = spawned_run("--mode", "adapt", "--exact-accumulate", "true", "--layer-type", layer_type)
    client = clients(run)
    message = report(client, lambda m: m.sampled_step and m.sampled_step >= 10)
    for layer in message.layers:
        # float32 rounding over a few hundred updates: tiny next to the drift itself
        assert 0.0 <= layer.exact_drift < 1e-3 * max(layer.drift, 1e-3)


@pytest.mark.parametrize("mode", ["train", "adapt"])
def test_save_then_resume_continues_at_the_same_step_with_identical_weights(
    spawned_run, clients, tmp_path, mode
):
    client = clients(spawned_run("--mode", mode))
    report(client, lambda m: m.step >= 7)
    assert client.request("pause").ok
    step = report(client, lambda m: m.paused).step
    saved = client.request("save", path=str(tmp_path / "a.safetensors"))
    assert saved.ok and saved.extras["path"] == str(tmp_path / "a.safetensors")

    resumed_run = spawned_run("--resume", saved.extras["path"], "--start-paused", "true")
    resumed = clients(resumed_run)
    first = report(resumed)
    assert first.step == step and first.paused and first.tokens == step * 32
    again = resumed.request("save", path=str(tmp_path / "b.safetensors"))
    assert again.ok

    import mlx.core as mx

    a, b = (mx.load(str(tmp_path / n)) for n in ("a.safetensors", "b.safetensors"))
    assert sorted(a) == sorted(b) and any(k.startswith(("optimizer.", "cache.")) for k in a)
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name
    assert resumed.request("resume").ok
    report(resumed, lambda m: m.step > step)  # adapt: a restored cache steps on


def test_a_save_that_cannot_be_written_is_an_error_reply_and_the_run_goes_on(
    spawned_run, clients, tmp_path
):
    client = clients(spawned_run())
    report(client, lambda m: m.step >= 1)
    for what, target in unwritable_targets(tmp_path).items():
        reply = client.request("save", path=target)
        assert not reply.ok, what
        assert reply.error.startswith(f"cannot write checkpoint {target}: "), reply
        assert "\n" not in reply.error, what
    step = client.latest().step
    report(client, lambda m: m.step > step + 3)  # still training
    good = tmp_path / "good.safetensors"
    assert client.request("save", path=str(good)).ok and good.is_file()


def test_a_relative_save_after_the_runs_folder_was_deleted_is_an_error_reply(
    spawned_run, clients, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    run = spawned_run()  # its working folder: `work`
    monkeypatch.chdir(tmp_path)
    client = clients(run)
    report(client, lambda m: m.step >= 1)
    work.rmdir()
    for path in (None, "a.safetensors"):  # the default is relative too: checkpoints/step-N
        reply = client.request("save", **({"path": path} if path else {}))
        assert not reply.ok and "the run's working folder no longer exists" in reply.error
    step = client.latest().step
    report(client, lambda m: m.step > step + 3)  # still training
    assert client.request("save", path=str(tmp_path / "b.safetensors")).ok


def test_a_save_to_a_path_too_long_is_a_short_error_and_the_monitor_stays_attached(
    spawned_run, clients, tmp_path
):
    client = clients(spawned_run())
    report(client, lambda m: m.step >= 1)
    path = str(tmp_path / ("é" * 20_000))  # 40 kB in, 120 kB echoed as JSON escapes
    reply = client.request("save", path=path)
    assert not reply.ok and reply.error.startswith(f"cannot write checkpoint {tmp_path}")
    assert reply.error.endswith("...") and len(reply.error) <= 1003
    assert client.alive and client.request("hello").ok  # the reply fit a line: still attached


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="Linux: another process's limits")
def test_a_full_disk_fails_the_save_keeps_the_old_file_and_the_run_goes_on(
    spawned_run, clients, tmp_path
):
    run = spawned_run()
    client = clients(run)
    report(client, lambda m: m.step >= 1)
    path = tmp_path / "c.safetensors"
    assert client.request("save", path=str(path)).ok
    before = path.read_bytes()
    limits = resource.prlimit(run.pid, resource.RLIMIT_FSIZE)
    # no file of the run may grow past 4 KiB: its writes fail (EFBIG, as ENOSPC on a full
    # disk) part way through the checkpoint; Python ignores the SIGXFSZ that comes with it
    resource.prlimit(run.pid, resource.RLIMIT_FSIZE, (4096, limits[1]))
    reply = client.request("save", path=str(path))
    assert not reply.ok and reply.error == f"cannot write checkpoint {path}: File too large"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.safetensors"]
    step = client.latest().step
    report(client, lambda m: m.step > step + 3)  # still training
    resource.prlimit(run.pid, resource.RLIMIT_FSIZE, limits)  # space again
    assert client.request("save", path=str(path)).ok
    assert path.read_bytes() != before and os.listdir(tmp_path) == ["c.safetensors"]


def test_malformed_commands_get_an_error_and_the_run_continues(spawned_run, clients):
    run = spawned_run()
    client = clients(run)
    step = report(client, lambda m: m.step >= 1).step
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect(run.socket_path)
    raw.sendall(b'{"cmd": "__import__(\'os\').system(\'true\')", "id": 1}\nnot json\n')
    replies, buffer = [], b""
    while len(replies) < 2:
        data = raw.recv(65536)
        assert data, "the run closed the connection"
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        replies += [m for m in map(decode_message, filter(None, lines)) if isinstance(m, Reply)]
    raw.close()
    assert [r.ok for r in replies] == [False, False]
    assert "unknown command" in replies[0].error and "not JSON" in replies[1].error
    unknown = client.request("launch_missiles")
    assert not unknown.ok and "unknown command" in unknown.error
    report(client, lambda m: m.step > step + 3 and not m.paused)


def test_stop_finishes_cleanly_with_exit_zero(spawned_run, clients):
    run = spawned_run()
    client = clients(run)
    report(client, lambda m: m.step >= 1)
    assert client.request("stop").ok
    assert run.wait(30) == 0
    wait_until(lambda: not client.alive, 5)
    assert client.bye is not None and client.bye.exit_code == 0
    assert not os.path.exists(run.socket_path)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
def test_a_stop_signal_stops_cleanly(spawned_run, clients, signum):
    # SIGHUP: the terminal of a run started by hand was closed
    run = spawned_run()
    client = clients(run)
    report(client, lambda m: m.step >= 1)
    os.kill(run.pid, signum)
    assert run.wait(30) == 0
    wait_until(lambda: client.bye is not None, 5, "the bye")


def test_sigkill_is_detected_within_two_intervals(spawned_run, clients):
    run = spawned_run()
    client = clients(run)
    report(client, lambda m: m.step >= 1)
    os.kill(run.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not client.alive, timeout=2.0, what="the client noticing the kill")
    assert time.monotonic() - killed < 2.0  # two intervals of the monitor's default 1 s
    assert run.wait(10) == -signal.SIGKILL
    with pytest.raises(ChannelError):
        client.request("pause", timeout=1)


def test_stale_socket_of_a_killed_run_is_cleaned_up(spawned_run, clients, tmp_path):
    path = str(tmp_path / "run.sock")
    first = spawned_run(socket_path=path)
    report(clients(first), lambda m: m.step >= 1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    assert stat.S_ISSOCK(os.stat(path).st_mode)  # left behind by the dead run
    second = spawned_run(socket_path=path)
    assert report(clients(second), lambda m: m.step >= 1).pid == second.pid


def test_socket_is_private(spawned_run, clients):
    run = spawned_run()
    clients(run)
    assert stat.S_IMODE(os.stat(run.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(run.socket_path)).st_mode) == 0o700


@pytest.fixture
def own_folder_run(private_tmpdir):
    """Factory: `ttt-run --preset tiny ARGS` without --socket, so that it makes its own private
    folder, in the test's private TMPDIR -> (process, TMPDIR). Its stderr is a pipe nobody
    reads (the caller may close it). Killed at teardown if still alive."""
    started: list[subprocess.Popen] = []

    def start(*args: str, stdin=subprocess.DEVNULL):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ttt_runtime", "run", "--preset", "tiny", *args],
            stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=dict(os.environ, TMPDIR=str(private_tmpdir)),
        )  # fmt: skip
        started.append(proc)
        return proc, private_tmpdir

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdin:
            proc.stdin.close()
        proc.stderr.close()


def own_socket(proc, tmpdir) -> str:
    """The socket in the run's own private folder, once it answers."""

    def answering():
        assert proc.poll() is None, f"the run exited {proc.returncode}"
        for path in map(str, tmpdir.glob("ttt-run-*/run.sock")):
            with contextlib.suppress(ChannelError):
                ChannelClient.connect(path, timeout=5.0).close()
                return path
        return None

    return wait_until(answering, READY_S, "the run's socket")


def test_a_closed_stderr_never_ends_the_run(own_folder_run):
    proc, tmpdir = own_folder_run()
    proc.stderr.close()  # as when the monitor reading it was SIGKILLed
    path = own_socket(proc, tmpdir)  # its "listening on" line went to the broken pipe
    time.sleep(3 * PROGRESS_S)  # no monitor attached: progress lines go there too
    assert proc.poll() is None, f"the run exited {proc.returncode}"
    client = ChannelClient.connect(path)
    try:
        step = report(client).step
        report(client, lambda m: m.step > step + 3)
        assert client.request("stop").ok
    finally:
        client.close()
    assert proc.wait(30) == 0
    assert list(tmpdir.glob("ttt-run-*")) == []


@pytest.mark.parametrize("how", ["sigterm", "sighup", "lifeline", "error", "setup"])
def test_every_exit_removes_the_private_folder_the_run_made(own_folder_run, tmp_path, how):
    data = tmp_path / "data"
    data.mkdir()
    args, stdin = [], subprocess.DEVNULL
    if how == "lifeline":
        args, stdin = ["--exit-with-parent"], subprocess.PIPE
    elif how == "error":
        for i in range(12):  # more files than the stream keeps in memory
            (data / f"{i:02}.txt").write_text(f"file {i} " * 40)
        args = ["--data", str(data)]
    elif how == "setup":
        args = ["--data", str(data)]  # an empty folder: nothing to train on
    proc, tmpdir = own_folder_run(*args, stdin=stdin)
    if how == "setup":
        assert proc.wait(READY_S) == 2
    elif how in ("sigterm", "sighup"):
        # as early as can be: the folder exists, the run may still be setting up
        wait_until(
            lambda: proc.poll() is None and list(tmpdir.glob("ttt-run-*")), READY_S, "folder"
        )
        proc.send_signal(signal.SIGHUP if how == "sighup" else signal.SIGTERM)
        assert proc.wait(READY_S) == 0
    else:
        client = ChannelClient.connect(own_socket(proc, tmpdir))
        try:
            report(client, lambda m: m.step >= 1)
            if how == "lifeline":
                proc.stdin.close()  # the process that started the run is gone
            else:
                for file in data.iterdir():
                    file.unlink()  # the data vanishes under the running stream
            assert proc.wait(60) == (0 if how == "lifeline" else 1)
        finally:
            client.close()
    assert list(tmpdir.glob("ttt-run-*")) == []


@pytest.mark.parametrize("replaced_by", [None, "fifo"])
def test_a_run_that_raises_sends_its_error_and_exits_nonzero(
    spawned_run, clients, tmp_path, replaced_by
):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):  # more files than the stream keeps in memory
        (data / f"{i:02}.txt").write_text(f"file {i} " * 40)
    run = spawned_run("--data", str(data))
    client = clients(run)
    report(client, lambda m: m.step >= 1)
    for file in data.iterdir():
        file.unlink()  # the data vanishes under the running stream
        if replaced_by == "fifo":
            os.mkfifo(file)  # opening it to read would wait for a writer forever
    assert run.wait(60) == 1
    wait_until(lambda: client.last_error is not None, 5, "the error message")
    assert client.last_error.exc_type == "StreamError"
    assert "unreadable" in client.last_error.message
    assert "Traceback" in client.last_error.traceback


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ttt_runtime", "run", *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seq-len", "0"], "seq_len"),
        (["--num-heads", "3"], "num_heads"),
        (["--mode", "dream"], "mode"),
        (["--data", "/nonexistent/corpus"], "/nonexistent/corpus"),
        (["--resume", "/nonexistent/ckpt.safetensors"], "/nonexistent/ckpt.safetensors"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_field(args, needle, tmp_path):
    result = run_cli("--socket", str(tmp_path / "s.sock"), "--preset", "tiny", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_a_lifeline_on_a_closed_stdin_is_one_line_and_exit_2(tmp_path):
    socket_path = tmp_path / "s.sock"
    command = [sys.executable, "-m", "ttt_runtime", "run", "--preset", "tiny", "--socket",
               str(socket_path), "--exit-with-parent", "--max-steps", "3"]  # fmt: skip
    # stdin closed: there is no parent's pipe to watch, and fd 0 would be the next file opened
    result = subprocess.run(["bash", "-c", 'exec "$@" <&-', "bash", *command],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "ttt-run: error: --exit-with-parent: stdin is closed; it must be the starting "
        "process's pipe"
    ]
    assert not socket_path.exists()


def test_a_truncated_or_edited_checkpoint_is_refused_in_one_line(spawned_run, clients, tmp_path):
    client = clients(spawned_run())
    report(client, lambda m: m.step >= 1)
    path = tmp_path / "whole.safetensors"
    assert client.request("save", path=str(path)).ok
    data = path.read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(data)
    change_a_digit(edited, "step")
    for broken, needle in ((half, "truncated"), (edited, "checksum")):
        result = run_cli("--socket", str(tmp_path / "s.sock"), "--resume", str(broken))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(broken) in lines[0] and needle in lines[0]


@pytest.mark.parametrize("field, value", [("config", "[1]"), ("cache_offsets", "[-1]")])
def test_a_checkpoint_with_bad_metadata_is_refused_in_one_line(tmp_path, field, value):
    path = crafted(tmp_path, field, value)
    result = run_cli("--socket", str(tmp_path / "s.sock"), "--resume", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and field in lines[0]


@pytest.mark.parametrize("mode", ["train", "adapt"])
def test_a_checkpoint_whose_learning_state_does_not_fit_is_refused_in_one_line(
    spawned_run, clients, tmp_path, mode
):
    import dataclasses

    import mlx.core as mx

    from ttt_runtime import checkpoint as ckpt

    client = clients(spawned_run("--mode", mode))
    report(client, lambda m: m.step >= 1)
    path = str(tmp_path / "whole.safetensors")
    assert client.request("save", path=path).ok
    whole = ckpt.load(path)
    # crafted, with a checksum made by the same code: an unkeyed hash guards only mistakes
    if mode == "adapt":  # an offset, or a block's cache arrays, missing
        lost = {k: v for k, v in whole.arrays.items() if not k.startswith("cache.1.")}
        brokens, needle = [{"cache_offsets": []}, {"arrays": lost}], "caches"
    else:  # an optimizer array missing, or of another shape
        lost = {k: v for k, v in whole.arrays.items() if k != "optimizer.embed.weight.m"}
        reshaped = {**whole.arrays, "optimizer.step": mx.zeros((3, 3))}
        brokens, needle = [{"arrays": lost}, {"arrays": reshaped}], "optimizer state"
    for changes in brokens:
        broken = dataclasses.replace(whole, **changes)
        target = ckpt.save(str(tmp_path / "broken.safetensors"), broken)
        result = run_cli("--socket", str(tmp_path / "s.sock"), "--resume", target)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"checkpoint {target}: " in lines[0], lines
        assert needle in lines[0]


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="Linux: another process's limits")
def test_running_out_of_descriptors_never_locks_monitors_out(spawned_run, clients):
    run = spawned_run()
    client = clients(run)
    report(client, lambda m: m.step >= 1)
    assert client.request("pause").ok  # no step opens a data file while descriptors run out
    limits = resource.prlimit(run.pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{run.pid}/fd"))
    resource.prlimit(run.pid, resource.RLIMIT_NOFILE, (in_use + 8, limits[1]))
    storm = []
    for _ in range(40):  # more than the 8 spare descriptors and the accept backlog
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(0.5)
        storm.append(sock)
        with contextlib.suppress(OSError):  # the backlog is full: nobody can accept
            sock.connect(run.socket_path)
    time.sleep(1.0)  # the run's accept fails with EMFILE, again and again
    for sock in storm:
        sock.close()
    assert run.poll() is None
    late = clients(run)  # with the low limit still in force
    assert late.request("resume").ok
    step = report(late).step
    report(late, lambda m: m.step > step + 3)
    assert late.request("stop").ok
    assert run.wait(30) == 0


def test_a_flood_of_commands_neither_stops_the_steps_nor_grows_the_run(spawned_run, clients):
    run = spawned_run()
    watcher = clients(run)
    report(watcher, lambda m: m.step >= 1)
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.connect(run.socket_path)
    replies = []

    def send() -> None:
        batch = b"".join(b'{"cmd":"resume","id":%d}\n' % i for i in range(1000))
        with contextlib.suppress(OSError):  # until the test shuts the socket
            while True:
                flood.sendall(batch)

    def read() -> None:  # a flooding client that reads its replies, as in the issue
        with contextlib.suppress(OSError):
            while data := flood.recv(1 << 16):
                replies.append(data.count(b'"type":"reply"'))

    threads = [threading.Thread(target=f, daemon=True) for f in (send, read)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(replies) > 1000, 60, "the first thousand replies")
        rss = psutil.Process(run.pid).memory_info().rss
        step = watcher.latest().step
        time.sleep(8)
        grown = psutil.Process(run.pid).memory_info().rss - rss
        stepped = watcher.latest().step - step
    finally:
        flood.shutdown(socket.SHUT_RDWR)
        flood.close()
        for thread in threads:
            thread.join(10)
    assert stepped >= 50, f"only {stepped} steps in 8 s of flood"
    assert grown < 20 << 20, f"the run grew by {grown >> 20} MiB in 8 s of flood"
    assert sum(replies) > 1000  # the flood was served (a few lines per step), not refused
    assert watcher.request("stop").ok
    assert run.wait(30) == 0
