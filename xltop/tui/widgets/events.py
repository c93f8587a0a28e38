"""The events line: watchdog actions, run state changes, commands sent and their replies."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.widgets import Static

from xltop.units import printable


class EventLine(Static):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.events: deque[str] = deque(maxlen=50)

    def add(self, *events: str) -> None:
        if not events:
            return
        self.events.extend(events)
        newest = list(self.events)[-max(1, self.size.height) :]  # as many as there are rows
        text = Text("\n").join(Text(f"> {printable(event)}") for event in newest)
        self.update(text, layout=False)  # fixed size: no re-layout
