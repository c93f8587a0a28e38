"""The help screen: the command table, as the bindings and the palette also see it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from xltop.tui.commands import Command

INTRO = (
    "p pauses the RUN (training stops); f only freezes the DISPLAY. "
    "Ctrl+P opens the command palette with every action."
)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, commands: tuple[Command, ...], readonly: bool) -> None:
        super().__init__()
        self.commands = commands
        self.readonly = readonly

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static("xltop keys", id="help-title")
            yield Static(INTRO, id="help-intro")
            table: DataTable[str] = DataTable(
                id="help-table", cursor_type="none", show_header=False
            )
            table.add_columns("key", "what it does")
            for command in self.commands:
                table.add_row(command.key_text, command.help)
            yield table
            footer = "read-only: kill and run commands are off. " if self.readonly else ""
            yield Static(footer + "Esc, ? or q closes.", id="help-close")
