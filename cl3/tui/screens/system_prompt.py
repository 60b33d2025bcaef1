"""Edit the system prompt of the current conversation."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, TextArea

from .dialog import SaveCancelDialog


class SystemPromptScreen(SaveCancelDialog):
    def __init__(self, system_prompt: str) -> None:
        super().__init__()
        self.system_prompt = system_prompt

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("System prompt (applies to the next reply)", classes="dialog-title")
            yield TextArea(self.system_prompt, id="system-text", soft_wrap=True)
            yield from self.buttons()

    def action_save(self) -> None:
        self.dismiss(self.query_one("#system-text", TextArea).text.strip())
