"""Snapshot tests (pytest-textual-snapshot) of the main screen, the help screen and the kill
dialog, fed by the deterministic fake Snapshot source. Update with --snapshot-update after a
deliberate change, and look at the SVGs it writes."""

from __future__ import annotations

import pytest
from fake_source import FakeMonitor

from xltop.killer import KillTarget
from xltop.snapshot import RunState
from xltop.tui.app import XltopApp
from xltop.tui.widgets.kill_dialog import KillDialog

TICKS = 30


@pytest.fixture
def fake_app():
    """Factory: the app on a fake monitor whose ticks all land before the screenshot."""
    monitors: list[FakeMonitor] = []

    def make(state: RunState = RunState.RUNNING, readonly: bool = False) -> XltopApp:
        monitor = FakeMonitor(ticks=TICKS, state=state)
        monitors.append(monitor)
        return XltopApp(monitor, readonly=readonly, host="testhost")

    yield make
    for monitor in monitors:
        monitor.close()


async def all_ticks_shown(pilot) -> None:
    while pilot.app.snapshots_shown < TICKS:
        await pilot.pause(0.02)
    await pilot.pause()


def test_main_screen(snap_compare, fake_app):
    assert snap_compare(fake_app(), terminal_size=(160, 45), run_before=all_ticks_shown)


def test_main_screen_at_80x24(snap_compare, fake_app):
    assert snap_compare(fake_app(), terminal_size=(80, 24), run_before=all_ticks_shown)


def test_main_screen_with_a_dead_run(snap_compare, fake_app):
    dead = fake_app(RunState.DEAD)
    assert snap_compare(dead, terminal_size=(120, 36), run_before=all_ticks_shown)


def test_help_screen(snap_compare, fake_app):
    async def open_help(pilot) -> None:
        await all_ticks_shown(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(fake_app(), terminal_size=(120, 36), run_before=open_help)


def test_kill_dialog(snap_compare, fake_app):
    target = KillTarget(pid=2003, name="proc03", user="alice",
                        command="/usr/bin/proc03 --serve", started=0.0)  # fmt: skip

    async def open_dialog(pilot) -> None:
        await all_ticks_shown(pilot)
        pilot.app.push_screen(KillDialog(target))
        await pilot.pause()

    assert snap_compare(fake_app(), terminal_size=(120, 36), run_before=open_dialog)
