"""xltop.killer against real processes: refusals, SIGTERM, SIGKILL after the grace, pid reuse."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from xltop import killer

IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


def test_refuses_init_and_itself():
    assert killer.refusal(1) == "refused: pid 1 is the system's init process"
    for pid in (0, -1):
        assert killer.refusal(pid) == f"refused: pid {pid} is not a process id (they start at 1)"
    assert "xltop itself" in killer.refusal(os.getpid())
    assert isinstance(killer.lock_target(1), str)
    assert isinstance(killer.lock_target(os.getpid()), str)


def test_sigterm_ends_a_child_and_reports_it(children):
    proc = children("sleep", "60")
    target = killer.lock_target(proc.pid)
    assert isinstance(target, killer.KillTarget), target
    assert target.name == "sleep" and "sleep 60" in target.command
    result = killer.kill(target)
    assert result.ok, result.message
    assert "SIGTERM" in result.message
    proc.wait(10)  # psutil may have reaped our child already: then Popen sees no status
    assert not psutil.pid_exists(proc.pid)


def test_sigkill_follows_when_sigterm_is_ignored(children):
    proc = children(sys.executable, "-c", IGNORES_SIGTERM, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    target = killer.lock_target(proc.pid)
    result = killer.kill(target, grace=0.5)
    assert result.ok, result.message
    assert "SIGKILL" in result.message
    proc.wait(10)
    assert not psutil.pid_exists(proc.pid)


def test_a_process_that_is_gone_is_reported_not_ignored(children):
    proc = children("sleep", "60")
    target = killer.lock_target(proc.pid)
    proc.kill()
    proc.wait()
    result = killer.kill(target)
    assert not result.ok
    assert "gone" in result.message
    assert "gone" in killer.lock_target(proc.pid)


def test_a_reused_pid_is_not_killed(children):
    proc = children("sleep", "60")
    target = killer.lock_target(proc.pid)
    # The same pid as seen at another start time: what a reused pid looks like.
    stale = killer.KillTarget(**{**target.__dict__, "started": target.started - 100.0})
    result = killer.kill(stale)
    assert not result.ok and "reused" in result.message
    assert proc.poll() is None


def test_processes_of_other_users_are_refused(children, as_nobody):
    if os.geteuid() == 0:
        # As root, ask from a child that has become nobody about a process of ours (root's).
        proc = children("sleep", "60")
        assert "another user" in as_nobody(lambda: str(killer.lock_target(proc.pid)))
        assert proc.poll() is None
        return
    others = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.pid > 1]
    others = [p for p in others if p.info["uids"].real != os.getuid()]
    if not others:
        pytest.skip("no process of another user on this machine")
    assert "another user" in killer.refusal(others[0].pid)
