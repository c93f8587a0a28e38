"""A user's own MLX loop (ttt_runtime.report.Reporter) and mlx-lm's trainer (through
ttt_runtime.mlx_lm_callback) in real child processes, attached by the real xltop, headless."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from polling import wait_until
from test_app import pilot_test, run_of, until
from xltop_helpers import REPO, read_rows, run_xltop, wait_for_rows, xltop_env

from ttt_runtime.channel import ChannelClient
from xltop.runsources import AttachedRun
from xltop.tui.app import XltopApp
from xltop.tui.widgets.user_scalars import UserScalarsTable

pytestmark = pytest.mark.slow

# A plain MLX training loop, as a user writes one: a linear regression learnt by SGD, reported
# every step with an extra scalar. It steps until the file STOP exists (at most 300 s).
USER_LOOP = """
import sys, time
from pathlib import Path
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from ttt_runtime.report import Reporter

socket, stop = sys.argv[1], Path(sys.argv[2])
model, optimizer = nn.Linear(8, 1), optim.SGD(learning_rate=0.05)
x = mx.random.normal((32, 8)); y = x @ mx.arange(8.0).reshape(8, 1)
step = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))
reporter = Reporter(socket=socket, name="regression")
deadline = time.monotonic() + 300
while not stop.exists() and time.monotonic() < deadline:
    loss, grads = step(model)
    optimizer.update(model, grads)
    mx.eval(loss, model.parameters())
    reporter.step(loss=loss, tokens=x.shape[0], lr=0.05)
    time.sleep(0.01)  # the machine is shared: the loop need not eat a core
reporter.close()
print("steps", reporter._record.step)
"""


@pytest.fixture
def user_loop(tmp_path):
    """Factory: the user's loop above in a real child process, listening at `tmp_path/u.sock`;
    `finish()` asks it to end and returns (exit code, stdout, stderr). Killed at teardown if
    still running."""
    script, stop, sock = tmp_path / "loop.py", tmp_path / "STOP", tmp_path / "u.sock"
    script.write_text(USER_LOOP)
    started: list[subprocess.Popen] = []

    def start() -> tuple[str, Callable[[], tuple[int, str, str]]]:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(sock), str(stop)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=xltop_env(),
        )  # fmt: skip
        started.append(proc)
        wait_until(lambda: sock.exists() or proc.poll() is not None, 120, "the loop's socket")
        assert proc.poll() is None, proc.communicate()

        def finish() -> tuple[int, str, str]:
            stop.touch()
            out, err = proc.communicate(timeout=60)
            return proc.returncode, out, err

        return str(sock), finish

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _first_report(sock: str) -> None:
    """Wait for the loop's first report (its imports and compiling take a while on a loaded
    machine), so that xltop's rows are the loop's and not its start."""
    client = ChannelClient.connect(sock)
    try:
        wait_until(client.latest, 120, "the loop's first report")
    finally:
        client.close()


def _xltop_rows(sock: str, csv: Path, count: int = 4) -> list[dict[str, str]]:
    result = run_xltop("--attach", sock, "--headless", "--quiet", "--csv", str(csv),
                       "--count", str(count), "--interval", "0.3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return read_rows(csv)


def test_a_plain_mlx_loop_shows_in_xltop_and_survives_its_monitors_coming_and_going(
    user_loop, tmp_path, xltop_process
):
    sock, finish = user_loop()
    _first_report(sock)
    rows = _xltop_rows(sock, tmp_path / "a.csv")
    assert len(rows) == 4
    last = rows[-1]
    assert {r["run_state"] for r in rows} == {"running"}
    assert int(rows[0]["step"]) >= 1 and int(last["step"]) > int(rows[0]["step"])
    assert int(last["tokens"]) == 32 * int(last["step"])
    assert float(last["tokens_per_s"]) > 0 and float(last["step_ms"]) >= 10  # it sleeps 10 ms
    assert 0 <= float(last["loss_bpb"]) < float(rows[0]["loss_bpb"])  # it learns
    assert float(last["user_lr"]) == 0.05
    assert float(last["mlx_peak_mib"]) >= 0 and float(last["mlx_limit_mib"]) > 0
    assert last["rss_mib"]  # the loop's own process, found in the process table

    # A monitor killed mid-loop, then a new one: the loop goes on and the newcomer sees it.
    killed = xltop_process("--attach", sock, "--headless", "--quiet",
                           "--csv", str(tmp_path / "b.csv"), "--interval", "0.2")  # fmt: skip
    wait_for_rows(tmp_path / "b.csv", 2, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    again = _xltop_rows(sock, tmp_path / "c.csv", count=3)
    assert int(again[0]["step"]) > int(last["step"])
    code, out, err = finish()
    assert code == 0, err
    assert err == "" and int(out.split()[1]) >= int(again[-1]["step"])


@pilot_test
async def test_the_tui_shows_the_loops_scalars_and_its_p_pauses_the_loop(user_loop, monitors):
    sock, finish = user_loop()
    app = XltopApp(monitors(AttachedRun(sock)))
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.main_screen.query_one(UserScalarsTable)
        await until(pilot, lambda: table.row_count == 1, "the user scalars table")
        assert table.display and table.get_row("lr") == ["lr", "0.05"]
        header = str(app.main_screen.query_one("#header").content)
        assert "user/regression" in header
        await pilot.press("p")
        await until(pilot, lambda: run_of(app).state == "paused", "the loop to pause")
        # a step() already past its pause check when the command came is still counted
        settled = app.snapshots_shown
        await until(pilot, lambda: app.snapshots_shown >= settled + 2, "the step in flight")
        held, shown = run_of(app).step, app.snapshots_shown
        await until(pilot, lambda: app.snapshots_shown >= shown + 3, "three ticks")
        assert run_of(app).step == held  # step() blocks in the loop's own process
        await pilot.press("p")
        await until(pilot, lambda: run_of(app).step > held + 2, "the loop to go on")
    code, _, err = finish()
    assert code == 0, err


# mlx-lm's own trainer fine-tuning a tiny llama built here (random weights, random tokens: no
# download), reported by the callback: two lines of the user's code. It trains until STOP exists.
MLX_LM_TRAINING = """
import sys, time
from pathlib import Path
import mlx.core as mx, mlx.optimizers as optim, numpy as np
from mlx_lm.models import llama
from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
from ttt_runtime.mlx_lm_callback import XltopCallback

socket, stop, adapters = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
mx.random.seed(0)
model = llama.Model(llama.ModelArgs(
    model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
    num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64))
rng = np.random.default_rng(0)
data = [(rng.integers(0, 64, 33).tolist(), 0) for _ in range(16)]

def until_stopped(dataset, **options):  # mlx-lm's batches, until the test says stop
    for batch in iterate_batches(dataset, **options):
        if stop.exists():
            return
        time.sleep(0.01)  # the machine is shared
        yield batch

args = TrainingArgs(batch_size=4, iters=10**6, val_batches=2, steps_per_report=2,
                    steps_per_eval=50, adapter_file=adapters, max_seq_length=64)
train(model, optim.Adam(learning_rate=1e-3), data, data, args, iterate_batches=until_stopped,
      training_callback=XltopCallback(socket=socket, name="mlx-lm"))
"""


def test_mlx_lms_trainer_shows_in_xltop_through_the_callback(tmp_path):
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install xltop[mlx-lm])")
    script, stop, sock = tmp_path / "train.py", tmp_path / "STOP", tmp_path / "t.sock"
    script.write_text(MLX_LM_TRAINING)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(sock), str(stop), str(tmp_path / "adapters.safetensors")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=xltop_env(),
    )  # fmt: skip
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 120, "the trainer's socket")
        _first_report(str(sock))
        rows = _xltop_rows(str(sock), tmp_path / "t.csv")
    finally:
        stop.touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    first, last = rows[0], rows[-1]
    assert {r["run_state"] for r in rows} == {"running"}
    assert int(last["step"]) > int(first["step"]) and int(last["step"]) % 2 == 0  # per report
    assert int(last["tokens"]) > 0 and float(last["tokens_per_s"]) > 0
    assert 0 < float(last["loss_bpb"]) < 10  # cross-entropy over 64 tokens starts near ln 64
    assert float(last["user_learning_rate"]) == pytest.approx(1e-3)
    assert float(last["user_val_loss"]) > 0  # the first evaluation comes before any report
    assert (tmp_path / "adapters.safetensors").exists()  # the trainer ran to its normal end
