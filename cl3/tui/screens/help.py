"""The help screen: every key of the chat screen."""

from __future__ import annotations

from typing import ClassVar

from rich import box
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

KEYS = [
    ("Enter", "new line in the message"),
    ("Ctrl+J / Alt+Enter", "send the message"),
    ("Esc", "stop the reply (the partial reply is kept)"),
    ("Ctrl+R", "regenerate the last reply"),
    ("Ctrl+N", "new chat (the current one stays saved)"),
    ("F2", "edit the system prompt"),
    ("F3", "sampling parameters"),
    ("F4", "saved chats: reopen one"),
    ("F5", "export this chat as Markdown"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
]

NOTES = (
    "Chats are saved automatically after every message. When a chat no longer fits the context, the oldest turns "
    "are left out of the prompt (the system prompt is kept) and a notice says so. The status bar shows the speed "
    "of the last reply, the context used, the model file and its quantization type."
)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,f1,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        table = Table(box=box.SIMPLE_HEAD, expand=True)
        table.add_column("Key", style="bold", no_wrap=True)
        table.add_column("Action")
        for key, action in KEYS:
            table.add_row(key, action)
        with VerticalScroll(classes="dialog"):
            yield Label("cl3 chat — keys (Esc: close)", classes="dialog-title")
            yield Static(table)
            yield Static(NOTES, classes="help-notes")

    def action_close(self) -> None:
        self.dismiss(None)
