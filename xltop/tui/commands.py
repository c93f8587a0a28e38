"""The one command table: it drives the key bindings, the footer, the help screen and the palette.

Add a command here and it has a key, a footer entry, a help line and a palette entry; mark it
`changes_run` and `--readonly` (and a replay, which has no run) removes it everywhere at once;
its `scope` keeps it to live monitoring or to a replay (`xltop --replay`).
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding, BindingType

# Textual key names as people type them.
_KEY_TEXT = {
    "plus": "+",
    "minus": "-",
    "question_mark": "?",
    "f9": "F9",
    "f10": "F10",
    "space": "Space",
    "slash": "/",
}


@dataclass(frozen=True)
class Command:
    action: str  # XltopApp.action_<action>
    keys: tuple[str, ...]  # Textual key names
    label: str  # footer and palette title
    help: str  # one line: help screen and palette
    changes_run: bool = False  # acts on the run or on processes: gone under --readonly
    footer: bool = True
    scope: str = "any"  # "live": not in a replay; "replay": only in one

    def applies(self, readonly: bool, replay: bool) -> bool:
        if self.changes_run and (readonly or replay):
            return False
        return self.scope in ("any", "replay" if replay else "live")

    @property
    def key_text(self) -> str:
        return " ".join(_KEY_TEXT.get(key, key) for key in self.keys)


COMMANDS = (
    Command("toggle_pause", ("p",), "Pause run", "pause / resume the RUN itself: training stops, not just the screen", changes_run=True),  # noqa: E501
    Command("toggle_freeze", ("f",), "Freeze", "freeze / unfreeze the DISPLAY; the run goes on"),
    Command("clear_cache", ("c",), "Clear cache", "clear the run's MLX cache (the cache bar drops on the next tick)", changes_run=True),  # noqa: E501
    Command("reset", ("r",), "Reset", "reset the fast weights: start a new conversation", changes_run=True),  # noqa: E501
    Command("save", ("s",), "Save", "save a checkpoint of the run", changes_run=True),
    Command("toggle_log", ("l",), "Log", "start / stop logging one CSV row per tick", scope="live"),  # noqa: E501
    Command("interval_up", ("plus",), "Interval +", "longer interval between ticks", footer=False, scope="live"),  # noqa: E501
    Command("interval_down", ("minus",), "Interval -", "shorter interval between ticks", footer=False, scope="live"),  # noqa: E501
    Command("replay_play", ("space",), "Play/pause", "play / pause the replay", scope="replay"),
    Command("replay_step", ("n",), "Step", "show the replay's next tick, and pause", scope="replay"),  # noqa: E501
    Command("replay_speed", ("x",), "Speed", "replay speed: 1x, 10x, 100x", scope="replay"),
    Command("next_chart", ("g",), "Chart", "show the next chart (on narrow screens one chart shows)", footer=False),  # noqa: E501
    Command("sort", ("o",), "Sort", "sort the processes by the next column (or click a header)", footer=False),  # noqa: E501
    Command("filter", ("slash",), "Filter", "filter the processes by name or command (Enter keeps it, Esc clears it)", footer=False),  # noqa: E501
    Command("tree", ("t",), "Tree", "show the processes as a tree, each under its parent / as a list", footer=False),  # noqa: E501
    Command("kill", ("k", "f9"), "Kill", "kill the selected process: confirm, SIGTERM, SIGKILL after a grace", changes_run=True),  # noqa: E501
    Command("restart", ("R",), "Restart", "restart a dead run with the same flags", changes_run=True, footer=False),  # noqa: E501
    Command("help", ("question_mark",), "Help", "this screen"),
    Command("quit", ("q", "f10"), "Quit", "stop the hosted run cleanly, close the CSV, quit"),
)  # fmt: skip

BY_ACTION = {c.action: c for c in COMMANDS}


def available(readonly: bool, replay: bool = False) -> tuple[Command, ...]:
    return tuple(c for c in COMMANDS if c.applies(readonly, replay))


def bindings() -> list[BindingType]:
    """Every command's keys; XltopApp.check_action hides those that do not apply (the run
    commands under --readonly or in a replay, the replay's keys in live monitoring)."""
    return [Binding(",".join(c.keys), c.action, c.label, show=c.footer) for c in COMMANDS]
