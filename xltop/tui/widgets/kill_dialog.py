"""The kill confirmation: it names the process locked when it opened, whatever re-sorts below."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from xltop.killer import GRACE_S, KillTarget
from xltop.units import printable


class KillDialog(ModalScreen[bool]):
    BINDINGS = [("y", "answer(True)", "Kill"), ("n,escape", "answer(False)", "Cancel")]

    def __init__(self, target: KillTarget) -> None:
        super().__init__()
        self.target = target

    def compose(self) -> ComposeResult:
        t = self.target
        with Vertical(id="kill-box"):
            # Text, not a str: Static reads a str as markup, and a process names itself
            yield Static(Text(printable(f"Kill pid {t.pid} ({t.name})?")), id="kill-title")
            yield Static(
                Text(f"user {printable(t.user)}\ncommand {printable(t.command)}"),
                id="kill-command",
            )
            yield Static(
                f"SIGTERM now, SIGKILL if it is still there after {GRACE_S:g} s.", id="kill-how"
            )
            with Horizontal(id="kill-buttons"):
                yield Button("Kill (y)", variant="error", id="kill-yes")
                yield Button("Cancel (n)", variant="primary", id="kill-no")

    def on_mount(self) -> None:
        self.query_one("#kill-no", Button).focus()  # the safe answer is the default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "kill-yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
