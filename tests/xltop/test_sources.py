"""SystemSource against the real process table."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from polling import wait_until
from xltop_helpers import process_gone

from ttt_runtime.protocol import Reply
from xltop.snapshot import RunInfo
from xltop.sources import SystemSource


def test_system_figures_are_sane():
    system, processes = SystemSource(top_n=10).sample()
    assert system.total > 0 and system.available > 0 and system.used > 0
    assert system.used + system.available == system.total
    assert 0.0 <= system.cpu_percent <= 100.0
    assert 0 < len(processes) <= 10
    rss = [p.rss for p in processes]
    assert rss == sorted(rss, reverse=True)


def test_own_process_is_described():
    source = SystemSource(top_n=10_000)
    _, processes = source.sample()
    me = next(p for p in processes if p.pid == os.getpid())
    assert me.rss > 1 << 20
    assert "python" in me.name.lower() or "pytest" in me.name.lower()
    assert "pytest" in me.command or "python" in me.command
    assert me.user
    assert not me.is_run


def test_run_process_is_listed_even_outside_the_top(children):
    sleeper = children(sys.executable, "-c", "import time; time.sleep(60)")
    source = SystemSource(top_n=1)
    _, processes = source.sample(run_pid=sleeper.pid)
    assert len(processes) == 2
    run = next(p for p in processes if p.is_run)
    assert run.pid == sleeper.pid and run.rss > 0


def test_busy_process_shows_cpu(children):
    busy = children(sys.executable, "-c", "while True: pass")
    source = SystemSource(top_n=1)
    cpu = 0.0
    deadline = time.monotonic() + 20
    while cpu < 5.0 and time.monotonic() < deadline:
        time.sleep(0.5)
        _, processes = source.sample(run_pid=busy.pid)
        cpu = next(p.cpu_percent for p in processes if p.pid == busy.pid)
    assert cpu >= 5.0


def test_vanishing_processes_are_skipped_not_raised():
    # Short-lived processes come and go while we sample: no sample may raise.
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            subprocess.run(["true"])

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        source = SystemSource(top_n=10_000)
        for _ in range(30):
            _, processes = source.sample()
            assert processes
    finally:
        stop.set()
        thread.join()


HOLDS_MEMORY = (
    "import time\n"
    "data = b'x' * ({mib} << 20)\n"  # written, so resident
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_the_psutil_reader_used_off_linux_agrees_with_proc(children, tmp_path):
    """macOS reads processes with psutil: forced here, it must see what the /proc reader sees."""
    holders = {
        mib: children(sys.executable, "-c", HOLDS_MEMORY.format(mib=mib), stdout=subprocess.PIPE)
        for mib in (32, 96)
    }
    for holder in holders.values():
        assert holder.stdout.readline().strip() == b"ready"
    busy = children(sys.executable, "-c", "while True: pass")
    long_named = tmp_path / "xltop-long-named-sleeper"
    long_named.symlink_to(shutil.which("sleep"))
    sleeper = children(str(long_named), "60")
    ours = [*holders.values(), busy, sleeper]

    alive_before = set(psutil.pids())
    sources = [SystemSource(top_n=100_000, system=system) for system in ("linux", "darwin")]
    time.sleep(2.0)  # one CPU window, sampled by both readers back to back
    by_proc, by_psutil = ({p.pid: p for p in source.sample()[1]} for source in sources)
    alive_throughout = alive_before & set(psutil.pids())
    assert alive_throughout <= by_proc.keys() and alive_throughout <= by_psutil.keys()

    for proc in ours:
        linux, other = by_proc[proc.pid], by_psutil[proc.pid]
        assert (other.user, other.command) == (linux.user, linux.command)
        assert other.name.startswith(linux.name)
        assert abs(other.rss - linux.rss) <= max(linux.rss // 50, 1 << 20)
        assert abs(other.cpu_percent - linux.cpu_percent) <= 25.0
    for mib, holder in holders.items():
        assert by_proc[holder.pid].rss > mib << 20
    assert by_proc[busy.pid].cpu_percent >= 5.0 and by_psutil[busy.pid].cpu_percent >= 5.0
    assert by_proc[sleeper.pid].cpu_percent == by_psutil[sleeper.pid].cpu_percent == 0.0
    # /proc keeps the kernel's 15-byte name; psutil completes a cut name from the command line.
    assert by_proc[sleeper.pid].name == "xltop-long-name"
    assert by_psutil[sleeper.pid].name == "xltop-long-named-sleeper"


# -- the run as a source (real runs, tiny preset) -----------------------------------------------


@pytest.fixture
def hosted():
    """Factory: HostedRun(args); closed (its run stopped) at teardown."""
    from xltop.runsources import HostedRun

    runs = []

    def start(*args: str) -> HostedRun:
        run = HostedRun(["--preset", "tiny", *args])
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def test_hosted_run_reports_commands_and_restarts(hosted):
    run = hosted()
    start = time.monotonic()
    info = run.sample()  # the run is still importing MLX: this must not wait for it
    assert time.monotonic() - start < 0.5 and info.state in ("starting", "running")
    assert run.wait_ready(120)
    info = run.sample()
    assert info.state == "running" and info.pid == run.pid and info.preset == "tiny"
    assert run.send("pause").ok
    wait_for_state(run, "paused", 30)
    old_pid = run.pid
    run.restart()
    assert run.pid != old_pid and process_gone(old_pid)
    assert run.wait_ready(120) and run.sample().state == "running"
    pid = run.pid
    run.close()
    assert run.sample().state == "dead" and run.sample().exit_code == 0
    assert run.send("pause") == Reply(id=None, cmd="pause", ok=False, error="run is not running")
    assert process_gone(pid)


def test_a_run_that_fails_is_dead_with_its_error(hosted, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run = hosted("--data", str(empty))
    assert not run.wait_ready(120)
    info = run.sample()
    assert info.state == "dead" and info.exit_code not in (None, 0)
    assert info.last_error and "empty.txt" in info.last_error


def test_attached_run_sees_the_run_stop(tiny_run):
    from xltop.runsources import AttachedRun, RunSourceError

    process = tiny_run()
    run = AttachedRun(process.socket_path)
    try:
        assert run.wait_ready(60) and run.pid == process.pid
        with pytest.raises(RunSourceError, match="attached"):
            run.restart()
        process.stop(10.0)
        wait_for_state(run, "dead", 10)
    finally:
        run.close()


def test_commands_are_one_line(children):
    script = children(sys.executable, "-c", "import time\ntime.sleep(60)")
    source = SystemSource(top_n=1)
    _, processes = source.sample(run_pid=script.pid)
    command = next(p.command for p in processes if p.pid == script.pid)
    assert "\n" not in command and "time.sleep(60)" in command


def wait_for_state(run, state: str, timeout: float) -> RunInfo:
    """Sample `run` until its state is `state`; the RunInfo, or fail after `timeout`."""
    return wait_until(
        lambda: (info := run.sample()).state == state and info,
        timeout,
        lambda: f"state {state} (the run is still {run.sample().state})",
    )


def test_a_stopped_run_is_stalled_after_the_bound_and_running_again_once_continued(hosted):
    from xltop.runsources import STALL_MIN_S

    run = hosted()
    assert run.wait_ready(120)
    # a timed step: the bound then knows the step time
    wait_until(lambda: run.sample().step_ms is not None, 60, "a timed step")
    os.kill(run.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # A tiny run's steps take milliseconds: the bound is the floor, never less.
        while time.monotonic() - stopped_at < STALL_MIN_S - 1:
            assert run.sample().state == "running"
            time.sleep(0.1)
        stalled = wait_for_state(run, "stalled", 30)
        assert STALL_MIN_S - 1 < time.monotonic() - stopped_at < STALL_MIN_S + 10
        assert run.report_age_s >= STALL_MIN_S
        # A stalled run's figures stand, but no throughput: no step completes.
        assert stalled.tokens_per_s is None and stalled.step_ms is None
        assert stalled.step > 0 and stalled.pid == run.pid
    finally:
        os.kill(run.pid, signal.SIGCONT)
    resumed = wait_for_state(run, "running", 30)
    assert resumed.tokens_per_s is not None and run.report_age_s < STALL_MIN_S


def test_the_stall_bound_scales_with_the_runs_slowest_recent_step():
    from xltop.runsources import STALL_MIN_S, STALL_STEPS, stall_after_s

    assert stall_after_s([]) == STALL_MIN_S  # nothing timed yet: the floor
    assert stall_after_s([100.0, 140.0]) == STALL_MIN_S  # fast steps: the floor
    # A run of 4 s steps gets STALL_STEPS of its slowest step: a slow step is not a stall.
    assert stall_after_s([3000.0, 4000.0, 3500.0]) == STALL_STEPS * 4.0


def test_stopping_a_sigstopped_run_continues_it_and_it_exits_cleanly(tiny_run):
    run = tiny_run()
    os.kill(run.pid, signal.SIGSTOP)
    said: list[str] = []
    start = time.monotonic()
    exit_code = run.stop(10.0, on_wait=said.append)
    # Stopped, it could act on nothing (not even SIGTERM): it took 17 s and a SIGKILL.
    assert time.monotonic() - start < 5
    assert exit_code == 0 and process_gone(run.pid)
    assert said == []  # under a second: nothing to wait for


def test_a_run_process_without_a_stderr_pipe_is_refused_at_once(children, tmp_path):
    from ttt_runtime.launch import RunProcess

    # its stderr tail is what explains a failed run: without the pipe there would be none
    quiet = children(sys.executable, "-c", "pass")
    with pytest.raises(ValueError, match="stderr=subprocess.PIPE"):
        RunProcess(quiet, str(tmp_path / "no.sock"), private=False)


def test_a_run_that_never_exits_is_killed_at_the_timeout_saying_what_it_waits_for(
    children, tmp_path
):
    from ttt_runtime.launch import RunProcess

    # A process that ignores SIGTERM and has no channel: like a run stuck in a step.
    stuck = children(
        sys.executable, "-c",
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready')\n"
        "time.sleep(120)",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert stuck.stdout.readline() == "ready\n"
    process = RunProcess(stuck, str(tmp_path / "no.sock"), private=False)
    said: list[str] = []
    start = time.monotonic()
    assert process.stop(3.0, on_wait=said.append) == -signal.SIGKILL
    assert 3 <= time.monotonic() - start < 6
    assert said == [
        f"stopping the run (pid {stuck.pid}): waiting up to 2 s for it to finish its step "
        "and exit, then killing it"
    ]
