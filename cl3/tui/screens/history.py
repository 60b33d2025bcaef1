"""Saved conversations: pick one to reopen it."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ...chat import ConversationSummary


class HistoryScreen(ModalScreen[str | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Close")]

    def __init__(self, conversations: list[ConversationSummary]) -> None:
        super().__init__()
        self.conversations = conversations

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Saved chats ({len(self.conversations)}) — Enter: open, Esc: close", classes="dialog-title")
            options = [Option(f"{c.updated[:16].replace('T', ' ')}  {c.title}  ({c.n_messages} messages)", id=c.id)
                       for c in self.conversations]
            yield OptionList(*options, id="history-list")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
