"""The Reporter (ttt_runtime.report) in this process, on the real channel: commands, figures,
watched TTT layers, mistakes. Its user loops attached by the real xltop: tests/xltop/
test_reporter_e2e.py."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import mlx.core as mx
import mlx.nn as nn
import pytest
from messages import telemetry
from polling import wait_until

from ttt_runtime.channel import ChannelClient, ChannelError
from ttt_runtime.config import TTTLayerConfig
from ttt_runtime.figures import fast_weight_stats
from ttt_runtime.layers import TTTLinear
from ttt_runtime.protocol import ProtocolError, decode_message, encode
from ttt_runtime.report import UNSUPPORTED, Reporter


def _pair(tmp_path, **options) -> tuple[Reporter, ChannelClient]:
    reporter = Reporter(socket=str(tmp_path / "r.sock"), **options)
    return reporter, ChannelClient.connect(reporter.socket)


def _newest(client: ChannelClient, step: int):
    return wait_until(
        lambda: (r := client.latest()) is not None and r.step >= step and r, 10, f"step {step}"
    )


def test_each_command_is_obeyed_refused_or_handed_to_the_loop_and_none_hangs(tmp_path):
    loop_threads: list[str] = []

    def save(path):
        loop_threads.append(threading.current_thread().name)
        if path == "bad":
            raise OSError("disk full\nreally")
        return path or "mine.safetensors"

    reporter, client = _pair(tmp_path, save=save, name="mine")
    stepping = threading.Event()
    stepping.set()

    def loop() -> None:
        while stepping.is_set():
            reporter.step(loss=1.0, tokens=4)
            time.sleep(0.01)

    worker = threading.Thread(target=loop, name="user-loop")
    worker.start()
    try:
        assert client.hello.mode == "user" and client.hello.preset == "mine"
        assert client.request("clear_cache").extras == {"cache": mx.get_cache_memory()}
        assert client.request("save", path="x.st").extras == {"path": "x.st"}
        assert client.request("save").extras == {"path": "mine.safetensors"}
        failed = client.request("save", path="bad")
        assert not failed.ok and failed.error == "save failed: OSError: disk full really"
        assert loop_threads == ["user-loop"] * 3  # between two steps, on the loop's thread
        for cmd in ("reset", "stop"):
            reply = client.request(cmd)
            assert not reply.ok and reply.error == f"{cmd} is {UNSUPPORTED}"

        assert client.request("pause").ok
        time.sleep(0.3)  # the step in progress ends, and the next call of step() blocks
        held = reporter._record.step
        time.sleep(0.5)
        paused = _newest(client, held)
        assert paused.paused and paused.step == reporter._record.step == held
        assert client.request("save", path="p.st").extras == {"path": "p.st"}  # made meanwhile
        assert client.request("resume").ok
        _newest(client, paused.step + 3)

        client.request("pause")
        wait_until(lambda: (r := client.latest()) is not None and r.paused, 10)
        client.close()  # nobody is left to resume it: the loop goes on
        wait_until(lambda: reporter._record.step > paused.step + 5, 10, "the loop to go on")
    finally:
        stepping.clear()
        worker.join(10)
        reporter.close()
    assert not worker.is_alive()
    assert not (tmp_path / "r.sock").exists()


def test_a_report_carries_the_loops_figures_and_its_own_mlx_memory(tmp_path):
    reporter, client = _pair(tmp_path)
    try:
        held = mx.zeros((1 << 18,))  # 1 MiB of this process's MLX memory
        mx.eval(held)
        reporter.step(loss=mx.array(2.5), tokens=mx.array(100))  # the first: the warm-up
        time.sleep(0.05)
        reporter.step(loss=2.0, tokens=100, step=3, grad_norm=1.5, skipped=None)
        report = _newest(client, 3)
        assert report.warmup_ms is not None and report.tokens == 200
        assert report.step_ms >= 25  # 50 ms over two steps
        assert 100 / report.tokens_per_s >= 0.05
        assert report.loss_bpb == 2.0 and report.user == {"grad_norm": 1.5, "skipped": None}
        assert report.mlx.active >= held.nbytes
        reporter.update_scalars(val_loss=1.75)
        assert wait_until(lambda: client.latest().user.get("val_loss") == 1.75, 10)
        assert client.latest().step == 3  # no step counted
    finally:
        client.close()
        reporter.close()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.step(**{"a b": 1}), "scalar name 'a b': letters, digits and _ only"),
        (lambda r: r.step(lr="fast"), "scalar 'lr' must be a number, got str"),
        (lambda r: r.update_scalars(lr="0.1"), "scalar 'lr' must be a number, got str"),
        (lambda r: r.step(huge=10**400), "scalar 'huge' is out of a float's range"),
        (lambda r: r.step(loss="low"), "loss must be a number, got str"),
        (lambda r: r.step(loss=mx.array([1.0, 2.0])), "loss must be a number, got array"),
        (lambda r: r.step(tokens=None), "tokens must be a whole number from 0 to 2**53, got None"),
        (lambda r: r.step(tokens=-4), "tokens must be a whole number from 0 to 2**53, got -4"),
        (lambda r: r.step(tokens=float("nan")), "tokens must be a whole number from 0 to 2**53"),
        (
            lambda r: r.step(tokens=10**120),
            "tokens must be a whole number from 0 to 2**53, got 1000000",
        ),
        (lambda r: r.step(step="ten"), "step must be a whole number from 0 to 2**53, got 'ten'"),
        (lambda r: r.watch(nn.Linear(2, 2)), "Linear has no TTT layers"),
    ],
)
def test_a_mistake_in_the_users_call_is_one_clear_error(tmp_path, call, message):
    reporter = Reporter(socket=str(tmp_path / "r.sock"))
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            call(reporter)
    finally:
        reporter.close()


def test_scalars_beyond_64_are_left_out_with_one_warning_not_an_error(tmp_path, capsys):
    # a new name may come hours in (a scalar per epoch): the loop must not die of it
    reporter, client = _pair(tmp_path)
    try:
        reporter.step(**{f"s{i}": i for i in range(60)})
        reporter.step(**{f"late{i}": i for i in range(6)})
        reporter.update_scalars(later=1.0, s0=-1.0)
        report = _newest(client, 2)
        wait_until(lambda: client.latest().user["s0"] == -1.0, 10, "the update")
        user = client.latest().user
        assert len(user) == 64 and "late4" not in user and "later" not in user
        warning = "reporter: at most 64 extra scalars; 'late4' and later new names are left out\n"
        assert capsys.readouterr().err == warning  # once
        assert report.step == 2
    finally:
        client.close()
        reporter.close()


def test_a_step_that_does_not_move_forward_counts_as_one_with_one_warning(tmp_path, capsys):
    # a loop that gives each epoch's own step count: the second epoch must not end it
    reporter, client = _pair(tmp_path)
    try:
        for _epoch in range(2):
            for step in range(1, 4):
                reporter.step(step=step, tokens=1)
        report = _newest(client, 6)
        assert (report.step, report.tokens) == (6, 6)  # 3, then one a call
        warning = "reporter: step 1 does not come after step 3: counted as one step\n"
        assert capsys.readouterr().err == warning  # once
    finally:
        client.close()
        reporter.close()


def test_a_long_bad_scalar_name_is_cut_in_its_error(tmp_path):
    reporter = Reporter(socket=str(tmp_path / "r.sock"))
    try:
        with pytest.raises(ValueError, match="letters, digits and _ only") as error:
            reporter.step(**{"[red]" + "x" * 10_000: 1.0})
        assert str(error.value).startswith("scalar name '[red]xxx") and len(str(error.value)) < 200
    finally:
        reporter.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "x" * 10**6}, "name must be a str of at most 200 characters, got 'xxxxxx"),
        ({"name": 7}, "name must be a str of at most 200 characters, got 7"),
        ({"name": b"run"}, "name must be a str of at most 200 characters, got b'run'"),
        ({"sample_every": "5"}, "sample_every must be a whole number of at least 1, got '5'"),
        ({"sample_every": 0}, "sample_every must be a whole number of at least 1, got 0"),
        ({"save": "model.st"}, "save must be a function (path -> the path written), got str"),
    ],
)
def test_a_bad_option_is_refused_before_listening(tmp_path, options, message):
    # a name goes out with every report: a megabyte of it would be encoded ten times a second,
    # and a hello whose name is no string is refused by xltop (or not encoded at all); a save
    # that is no function would fail only when a monitor asks, hours in
    with pytest.raises(ValueError, match=re.escape(message)):
        Reporter(socket=str(tmp_path / "r.sock"), **options)
    assert not (tmp_path / "r.sock").exists()


@pytest.mark.parametrize("argv", [[], None])
def test_a_process_without_argv_is_named_python(tmp_path, monkeypatch, argv):
    # an interpreter embedded in an application may have an empty sys.argv, or none
    if argv is None:
        monkeypatch.delattr(sys, "argv")
    else:
        monkeypatch.setattr(sys, "argv", argv)
    reporter = Reporter(socket=str(tmp_path / "r.sock"))
    reporter.close()
    assert reporter.name == "python"


def test_a_socket_is_any_path_like_and_an_empty_one_is_refused(tmp_path):
    reporter = Reporter(socket=tmp_path / "r.sock")  # a pathlib.Path, as a user writes one
    try:
        reporter.step(loss=1.0)
        client = ChannelClient.connect(str(tmp_path / "r.sock"))
        assert _newest(client, 1).loss_bpb == 1.0 and client.hello.socket == reporter.socket
        client.close()
    finally:
        reporter.close()
    with pytest.raises(ChannelError, match="cannot listen at '': not a path"):
        Reporter(socket="")


def test_a_watched_ttt_layers_fast_weights_are_reported(tmp_path):
    layer = TTTLinear(TTTLayerConfig(hidden_size=16, num_heads=2, mini_batch_size=4))
    cache = layer.make_cache(1)
    origin = [cache.fast_weights]
    reporter, client = _pair(tmp_path, sample_every=2)
    try:
        reporter.watch(layer, caches=[cache])
        reporter.step(tokens=8)  # the first step is sampled: no update yet
        first = _newest(client, 1)
        assert first.sampled_step == 1 and first.layers[0].update_norm == 0
        for _ in range(3):
            before = [cache.fast_weights]
            mx.eval(layer(mx.random.normal((1, 8, 16)), cache=cache))  # one step: 2 mini-batches
            reporter.step(tokens=8)
        expected = fast_weight_stats([cache.fast_weights], before, origin)[0]
        report = _newest(client, 4)
        figures = report.layers[0]
        assert len(report.layers) == 1 and report.sampled_step == 4
        assert figures.w_norm == pytest.approx(expected["w_norm"], rel=1e-5)
        assert figures.update_norm == pytest.approx(expected["update_norm"], rel=1e-5)
        assert figures.drift == pytest.approx(expected["drift"], rel=1e-5)
        assert 0 < figures.update_norm < figures.drift  # three steps drift further than one

        reporter.watch(layer, caches=[cache])  # a new conversation: measured on its first step
        mx.eval(layer(mx.random.normal((1, 8, 16)), cache=cache))
        reporter.step(tokens=8)
        renewed = _newest(client, 5)
        assert renewed.sampled_step == 5 and renewed.layers[0].update_norm > 0
        assert renewed.layers[0].drift == pytest.approx(renewed.layers[0].update_norm)
    finally:
        client.close()
        reporter.close()


def test_a_report_without_user_scalars_is_read_as_having_none_and_a_bad_one_is_named():
    wire = json.loads(encode(telemetry(3, user={"lr": 0.1})))
    assert decode_message(json.dumps(wire)).user == {"lr": 0.1}
    del wire["user"]  # a report of an older run
    assert decode_message(json.dumps(wire)).user == {}
    wire["user"] = {"lr": "0.1"}
    with pytest.raises(ProtocolError, match="'user.lr' must be a number or null, got str"):
        decode_message(json.dumps(wire))


# A script that reports one step, waits for a monitor, then ends as argv[1] says: "raise" (an
# uncaught exception) or "return" (it just ends). It never closes its reporter itself.
ENDING = """
import sys, time
from ttt_runtime.report import Reporter
reporter = Reporter()
reporter.step(loss=1.0, tokens=1)
while not reporter._server.monitors:
    time.sleep(0.05)
time.sleep(0.3)
if sys.argv[1] == "raise":
    raise RuntimeError("diverged at step 1")
"""


@pytest.mark.parametrize("ending", ["raise", "return"])
def test_a_script_that_ends_or_raises_tells_its_monitors_and_leaves_no_socket(
    private_tmpdir, ending
):
    proc = subprocess.Popen(
        [sys.executable, "-c", ENDING, ending], stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TMPDIR=str(private_tmpdir)),
    )  # fmt: skip
    try:
        said = proc.stderr.readline()  # the private socket it made, printed
        sock = said.split("listening on ")[1].split(" ")[0]
        assert said == f"reporter: listening on {sock} (xltop --attach {sock})\n"
        client = ChannelClient.connect(sock)
        wait_until(lambda: not client.alive, 30, "the script to end")
    finally:
        _, err = proc.communicate(timeout=60)
    if ending == "raise":
        assert client.last_error.exc_type == "RuntimeError" and client.bye is None
        assert client.last_error.message == "diverged at step 1"
        assert proc.returncode == 1 and err.endswith("RuntimeError: diverged at step 1\n")
    else:
        assert client.bye.exit_code == 0 and client.bye.step == 1 and client.last_error is None
        assert proc.returncode == 0 and err == ""
    assert os.listdir(private_tmpdir) == ["mlx"]  # the socket's folder went with it


# A loop that forks a worker once a monitor is there: the worker inherits the reporter, steps
# and ends the normal way (its atexit runs); then the loop steps once more and ends when told.
FORKING = """
import os, sys, time
from ttt_runtime.report import Reporter
reporter = Reporter(socket=sys.argv[1])
reporter.step(loss=1.0, tokens=1)
while not reporter._server.monitors:
    time.sleep(0.05)
if os.fork() == 0:
    reporter.step(loss=2.0, tokens=1)
    sys.exit(0)
os.wait()
reporter.step(loss=3.0, tokens=1)
print("forked", flush=True)
sys.stdin.readline()
"""


def test_a_forked_child_leaves_its_parents_reporter_alone(tmp_path):
    sock = str(tmp_path / "r.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKING, sock], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 60, "the socket")
        client = ChannelClient.connect(sock)
        assert proc.stdout.readline() == "forked\n"
        report = _newest(client, 2)  # the child's step counted nowhere, its exit closed nothing
        assert report.loss_bpb == 3.0 and client.alive and client.bye is None
        assert os.path.exists(sock)
    finally:
        _, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and err == ""
    wait_until(lambda: not client.alive, 10, "the loop's bye")
    assert client.bye.step == 2 and not os.path.exists(sock)


def test_mlx_lms_trainer_counts_on_from_where_the_reporter_stands(tmp_path):
    """mlx-lm counts its iterations from 1 in each train(): after the loop's own steps, and in a
    second train() (a second phase) with the same callback, the callback goes on from the
    reporter's count, every iteration counted (not one step a report, as a step= that does not
    move forward is)."""
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install xltop[mlx-lm])")
    import mlx.optimizers as optim
    from mlx_lm.models import llama
    from mlx_lm.tuner.trainer import TrainingArgs, train

    from ttt_runtime.mlx_lm_callback import XltopCallback

    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=16, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=32))  # fmt: skip
    data = [(list(range(i, i + 17)), 0) for i in range(8)]
    args = TrainingArgs(
        batch_size=2, iters=4, steps_per_report=2, steps_per_eval=100, max_seq_length=32,
        adapter_file=str(tmp_path / "a.safetensors"),
    )  # fmt: skip
    reporter, client = _pair(tmp_path)
    try:
        for _ in range(3):  # the user's own loop first (a warm-up phase)
            reporter.step(tokens=1)
        callback = XltopCallback(reporter)
        reports = []
        for _ in range(2):
            train(model, optim.Adam(learning_rate=1e-3), data, None, args,
                  training_callback=callback)  # fmt: skip
            reports.append(_newest(client, 3 + 4 * (len(reports) + 1)))
        first, second = reports
        assert (first.step, second.step) == (7, 11)
        assert second.tokens - 3 == 2 * (first.tokens - 3) > 0  # sequences of one length
    finally:
        client.close()
        reporter.close()


# A loop that restored SIGPIPE's default action (as scripts piped into `head` do): a write to a
# monitor already gone must not kill it. It steps until told to end.
SIGPIPE_DEFAULT = """
import signal, sys, threading
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
from ttt_runtime.report import Reporter
reporter = Reporter(socket=sys.argv[1])
told = threading.Thread(target=sys.stdin.readline)
told.start()
while told.is_alive():
    reporter.step(loss=1.0)
    told.join(0.005)
reporter.close()
print("steps", reporter._record.step)
"""


def test_monitors_that_go_at_once_do_not_kill_a_loop_with_sigpipes_default_action(tmp_path):
    sock = str(tmp_path / "r.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGPIPE_DEFAULT, sock], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 60, "the socket")
        for _ in range(300):  # each gone before its hello is written: the hello meets EPIPE
            with socket.socket(socket.AF_UNIX) as gone:
                try:
                    gone.connect(sock)
                except OSError:  # the loop died: its exit status below says how
                    break
    finally:
        out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and err == "" and out.startswith("steps ")


def test_steps_and_scalars_from_several_threads_are_all_counted(tmp_path):
    # two threads step, a third sets a validation scalar meanwhile: no call may undo another's
    reporter, client = _pair(tmp_path)
    calls = 20_000

    def stepping() -> None:
        for _ in range(calls):
            reporter.step(tokens=1, train=1.0)

    def validating() -> None:
        for i in range(calls):
            reporter.update_scalars(val=i)

    threads = [threading.Thread(target=work) for work in (stepping, stepping, validating)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        report = _newest(client, 2 * calls)
        assert (report.step, report.tokens) == (2 * calls, 2 * calls)
        assert report.user == {"train": 1.0, "val": calls - 1}
    finally:
        client.close()
        reporter.close()


# A loop whose signal handler reports (a timer's scalar): the handler runs between two bytecodes
# of the loop's thread, inside a step() as likely as not.
SIGNAL_HANDLER = """
import signal, sys
from ttt_runtime.report import Reporter
reporter = Reporter(socket=sys.argv[1])
signal.signal(signal.SIGALRM, lambda *_: reporter.update_scalars(alarm=1.0))
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
for _ in range(20_000):
    reporter.step(tokens=1, lr=0.1)
signal.setitimer(signal.ITIMER_REAL, 0)
reporter.close()
print("steps", reporter.steps)
"""


def test_a_signal_handler_that_reports_inside_a_step_does_not_hang_the_loop(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_HANDLER, str(tmp_path / "r.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # hung: no exit status to read, the test fails here
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and err == "" and out == "steps 20000\n"
