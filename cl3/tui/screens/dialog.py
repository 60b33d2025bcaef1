"""What the Save/Cancel dialogs share: the keys, the button row, and the button handling."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import ModalScreen
from textual.widgets import Button


class SaveCancelDialog(ModalScreen):
    """A modal dialog with Save (Ctrl+S) and Cancel (Esc); subclasses define ``action_save``."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def buttons(self) -> ComposeResult:
        with Horizontal(classes="buttons"):
            yield Button("Save (Ctrl+S)", id="save", variant="primary")
            yield Button("Cancel (Esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_save(self) -> None:
        raise NotImplementedError

    def action_cancel(self) -> None:
        self.dismiss(None)
