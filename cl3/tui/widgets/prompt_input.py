"""The multi-line message box (Enter: new line; the send key is a screen binding shown in the footer)."""

from __future__ import annotations

from textual.widgets import TextArea


class PromptInput(TextArea):
    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         placeholder="Type a message (Enter: new line, Ctrl+J: send)…", **kwargs)
