"""XltopApp: the Textual TUI, one more consumer of the Monitor's Snapshots.

Everything that can block (a tick: psutil and the run's channel; commands to the run; kills; the
CSV) runs in worker threads, never on the event loop. The tick thread asks for the next tick
only once the last one is on screen, so ticks never pile up behind a slow frame.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from textual.app import App, ComposeResult, SystemCommand
from textual.containers import Horizontal
from textual.widgets import Footer
from textual.worker import get_current_worker

from xltop import __version__, killer
from xltop.csvlog import CsvSink
from xltop.monitor import Monitor
from xltop.replay import ReplayPlayer
from xltop.snapshot import ClusterState, RunInfo, RunState, Snapshot
from xltop.tui import commands
from xltop.tui.widgets.blocks import BlocksTable
from xltop.tui.widgets.charts import MetricCharts
from xltop.tui.widgets.events import EventLine
from xltop.tui.widgets.header import RunHeader
from xltop.tui.widgets.help_screen import HelpScreen
from xltop.tui.widgets.kill_dialog import KillDialog
from xltop.tui.widgets.memory import MemoryPanel
from xltop.tui.widgets.processes import ProcessFilter, ProcessTable
from xltop.tui.widgets.ray_panel import RayPanel
from xltop.tui.widgets.user_scalars import UserScalarsTable
from xltop.tui.widgets.workers import WorkersTable

Outcome = tuple[str, bool]  # a sentence for the events line, and whether it reports a failure
NARROW_COLUMNS = 120  # below this, one chart at a time
SHORT_ROWS = 30  # below this, one events line
INTERVALS = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # the ladder + and - climb
# The processes table's title once a cluster is watched: its processes and `k` stay local.
LOCAL_PROCESSES = "processes on this machine (k kills here only)"


def readonly_from_env() -> bool:
    return os.environ.get("XLTOP_READONLY", "").strip().lower() in ("1", "true", "yes")


class XltopApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "xltop"
    BINDINGS = commands.bindings()

    def __init__(
        self,
        monitor: Monitor | ReplayPlayer,  # a replay stands in for the Monitor: no run, no kill
        *,
        readonly: bool = False,
        csv_path: str | None = None,
        host: str | None = None,
    ) -> None:
        super().__init__()
        self.monitor = monitor
        self.replay = monitor if isinstance(monitor, ReplayPlayer) else None
        self.readonly = readonly or readonly_from_env()
        self.host = host or socket.gethostname()
        self.csv = CsvSink(csv_path, on_error=monitor.post_event)
        self.frozen = False
        self.last: Snapshot | None = None
        self.snapshots_shown = 0
        self._quitting = False
        self._mounted = False
        self._exit_when_mounted = False

    # -- layout and the tick loop -------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        with Horizontal(id="top"):
            yield MemoryPanel(id="memory")
            yield MetricCharts(id="charts")
        yield BlocksTable(id="blocks")
        yield UserScalarsTable(id="user-scalars")  # hidden until a user loop reports one
        yield WorkersTable(id="workers")  # hidden until a run spread over Ray actors reports
        yield RayPanel(id="ray")  # hidden until a Snapshot carries a cluster
        yield ProcessTable(id="processes")
        yield ProcessFilter(id="process-filter")  # hidden until / opens it
        yield EventLine(id="events")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.main_screen = self.screen  # widgets live here; dialogs stack above it
        self.main_screen.query_one(ProcessTable).focus()
        self.run_worker(self._tick_loop, thread=True, name="ticks", group="ticks")
        self._mounted = True
        if self._exit_when_mounted:
            self.exit()

    def on_unmount(self) -> None:
        if self.replay is not None:  # its tick waits for good while paused or at the end
            self.replay.close()

    def exit_soon(self) -> None:
        """Exit now, or as soon as the screen is up: exiting while Textual still composes the
        screen makes its compose fail with a MountError traceback (seen with SIGTERM at start)."""
        if self._mounted:
            self.exit()
        else:
            self._exit_when_mounted = True

    def _tick_loop(self) -> None:
        worker = get_current_worker()
        while not (worker.is_cancelled or self._quitting):
            try:
                snapshot = self.monitor.tick()
            except Exception as exc:  # a source failing must not end the display
                self.monitor.post_event(f"tick failed: {type(exc).__name__}: {exc}")
                time.sleep(self.monitor.interval)
                continue
            self.csv.write(snapshot)
            if worker.is_cancelled or self._quitting:
                return
            try:
                self.call_from_thread(self.show_snapshot, snapshot)
            except RuntimeError:
                if self.is_running:  # the display's own error: it ends the app, loudly
                    raise
                return  # the app stopped while this tick ran

    def show_snapshot(self, snapshot: Snapshot) -> None:
        # A tick that lands while the app shuts down: Textual clears `is_running` before it
        # removes any widget (the screen itself can still look attached while its children go).
        if not self.is_running:
            return
        self.last = snapshot
        self.snapshots_shown += 1
        self._show_header()
        self.main_screen.query_one(EventLine).add(*snapshot.events)
        self.main_screen.query_one(MetricCharts).record(snapshot)
        self.main_screen.query_one(BlocksTable).record(snapshot.run)
        if not self.frozen:
            self._show_panels(snapshot)

    def _show_panels(self, snapshot: Snapshot) -> None:
        self.main_screen.query_one(MemoryPanel).show(snapshot)
        self.main_screen.query_one(MetricCharts).redraw()
        self.main_screen.query_one(BlocksTable).show(snapshot.run)
        self.main_screen.query_one(UserScalarsTable).show_run(snapshot.run)
        self.main_screen.query_one(WorkersTable).show_run(snapshot.run)
        self.main_screen.query_one(ProcessTable).show(snapshot.processes)
        if snapshot.ray is not None:
            self._show_cluster(snapshot.ray)

    def _show_cluster(self, cluster: ClusterState) -> None:
        panel = self.main_screen.query_one(RayPanel)
        if not panel.display:  # the first Snapshot with a cluster
            panel.display = True
            self.main_screen.add_class("ray")
            self.main_screen.query_one(ProcessTable).set_heading(LOCAL_PROCESSES)
        panel.show(cluster)

    def _show_header(self) -> None:
        if self.last is None:
            return
        self.main_screen.query_one(RunHeader).show(
            self.last,
            version=__version__,
            host=self.host,
            frozen=self.frozen,
            readonly=self.readonly,
            csv=str(self.csv.path) if self.csv.active else None,
            replay=f"{self.replay.name} {self.replay.status}" if self.replay else None,
        )

    def say(self, text: str, error: bool = False) -> None:
        """An event of the app's own (a command and its reply) on the events line."""
        if not self.is_running:  # a reply that lands while the app shuts down (see show_snapshot)
            return
        self.main_screen.query_one(EventLine).add(text)
        if error:
            self.notify(text, severity="error")

    def _in_thread(self, work: Callable[[], Outcome | None], name: str) -> None:
        """Run `work` off the event loop; the (sentence, failed) it returns goes on screen."""

        def run() -> None:
            outcome = work()
            if outcome is not None and not self._quitting:
                self.call_from_thread(self.say, *outcome)

        self.run_worker(run, thread=True, name=name, group="commands")

    # -- actions: one per entry of xltop.tui.commands.COMMANDS -----------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        command = commands.BY_ACTION.get(action)
        return command is None or command.applies(self.readonly, self.replay is not None)

    def get_system_commands(self, screen: Any):
        for command in commands.available(self.readonly, self.replay is not None):
            action = getattr(self, f"action_{command.action}")
            yield SystemCommand(f"{command.label} ({command.key_text})", command.help, action)

    def _run(self) -> RunInfo | None:
        return self.last.run if self.last is not None else None

    def _send(self, cmd: str) -> None:
        runtime = self.monitor.runtime
        if runtime is None:
            self.say(f"not sent: {cmd} needs a run (xltop was started with --no-run)", True)
            return
        self.say(f"sent {cmd}")

        def send() -> Outcome:
            reply = runtime.send(cmd)
            if not reply.ok:
                return f"{cmd} failed: {reply.error or 'no reason given'}", True
            path = reply.extras.get("path")
            extra = f" -> {path}" if path else ""
            return f"{cmd}: ok{extra}", False

        self._in_thread(send, cmd)

    def action_toggle_pause(self) -> None:
        run = self._run()
        self._send("resume" if run is not None and run.state == RunState.PAUSED else "pause")

    def action_toggle_freeze(self) -> None:
        self.frozen = not self.frozen
        self.say("display frozen; the run goes on (f unfreezes)" if self.frozen else "display live")
        self._show_header()
        if not self.frozen and self.last is not None:
            self._show_panels(self.last)

    def action_clear_cache(self) -> None:
        self._send("clear_cache")

    def action_reset(self) -> None:
        self._send("reset")

    def action_save(self) -> None:
        self._send("save")

    def action_toggle_log(self) -> None:
        if self.csv.active:
            path = self.csv.stop()
            self.say(f"CSV log closed: {path}" if path else "CSV logging off")
        else:
            self.csv.start(self.csv.path or time.strftime("xltop-%Y%m%d-%H%M%S.csv"))
            self.say(f"CSV logging to {self.csv.path} from the next tick")
        self._show_header()

    def _step_interval(self, direction: int) -> None:
        assert isinstance(self.monitor, Monitor)  # check_action keeps + and - out of a replay
        current = self.monitor.interval
        if direction > 0:
            target = next((s for s in INTERVALS if s > current + 1e-9), INTERVALS[-1])
        else:
            target = next((s for s in reversed(INTERVALS) if s < current - 1e-9), INTERVALS[0])
        self.monitor.interval = target
        self.say(f"interval {self.monitor.interval:g} s")

    def action_interval_up(self) -> None:
        self._step_interval(+1)

    def action_interval_down(self) -> None:
        self._step_interval(-1)

    def on_resize(self) -> None:
        self.screen.set_class(self.size.width < NARROW_COLUMNS, "narrow")
        self.screen.set_class(self.size.height < SHORT_ROWS, "short")

    def action_next_chart(self) -> None:
        self.say(f"chart: {self.main_screen.query_one(MetricCharts).show_next()}")

    def action_sort(self) -> None:
        self.say(f"processes sorted by {self.main_screen.query_one(ProcessTable).cycle_sort()}")

    def action_filter(self) -> None:
        self.main_screen.query_one(ProcessFilter).open()

    def action_tree(self) -> None:
        tree = self.main_screen.query_one(ProcessTable).toggle_tree()
        self.say("processes as a tree (t: as a list)" if tree else "processes as a list")

    def action_kill(self) -> None:
        pid = self.main_screen.query_one(ProcessTable).selected_pid()
        if pid is None:
            self.say("not killed: no process selected", True)
            return

        def lock() -> Outcome | None:
            target = killer.lock_target(pid)
            if isinstance(target, str):
                return target, True
            self.call_from_thread(self._confirm_kill, target)
            return None

        self._in_thread(lock, "kill")

    def _confirm_kill(self, target: killer.KillTarget) -> None:
        def answered(yes: bool | None) -> None:
            if not yes:
                self.say(f"kill of pid {target.pid} cancelled")
                return
            self.say(f"SIGTERM to pid {target.pid} ({target.name})")
            self._in_thread(lambda: _kill_outcome(target), "kill")

        self.push_screen(KillDialog(target), answered)

    def action_restart(self) -> None:
        run, runtime = self._run(), self.monitor.runtime
        if runtime is None or run is None:
            self.say("not restarted: there is no run", True)
            return
        if run.state != RunState.DEAD:
            self.say(f"not restarted: the run is {run.state}; R restarts a dead run", True)
            return
        self.say("restarting the run")

        def restart() -> Outcome:
            try:
                runtime.restart()
            except Exception as exc:  # e.g. an attached run: the message says why
                return f"cannot restart: {exc}", True
            return "run restarted", False

        self._in_thread(restart, "restart")

    def _replay_control(self, control: Callable[[ReplayPlayer], str]) -> None:
        if self.replay is not None:  # check_action keeps these keys to a replay
            self.say(control(self.replay))
            self._show_header()

    def action_replay_play(self) -> None:
        self._replay_control(ReplayPlayer.toggle_play)

    def action_replay_step(self) -> None:
        self._replay_control(ReplayPlayer.step)

    def action_replay_speed(self) -> None:
        self._replay_control(ReplayPlayer.next_speed)

    def action_help(self) -> None:
        replay = self.replay is not None
        self.push_screen(HelpScreen(commands.available(self.readonly, replay), self.readonly))

    async def action_quit(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        self.say("stopping the run and closing the CSV ...")

        def stop() -> None:
            self.csv.stop()
            # a run that is slow to stop (a long step) says what the quit waits for
            self.monitor.close(on_wait=lambda text: self.call_from_thread(self.say, text))
            self.call_from_thread(self.exit)

        self.run_worker(stop, thread=True, name="quit", group="quit")


def _kill_outcome(target: killer.KillTarget) -> Outcome:
    result = killer.kill(target)
    return result.message, not result.ok
