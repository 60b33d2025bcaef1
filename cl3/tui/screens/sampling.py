"""The sampling-parameters panel."""

from __future__ import annotations

from dataclasses import fields
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from ...chat import SamplingParams
from ...errors import Cl3Error

LABELS = {
    "temperature": "Temperature (0 = greedy)",
    "top_p": "Top-p",
    "top_k": "Top-k (0 = off)",
    "min_p": "Min-p",
    "repeat_penalty": "Repeat penalty",
    "max_tokens": "Max tokens per reply",
    "seed": "Seed (-1 = random)",
}


class SamplingScreen(ModalScreen[SamplingParams | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, sampling: SamplingParams) -> None:
        super().__init__()
        self.sampling = sampling

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Sampling parameters", classes="dialog-title")
            with Grid(id="sampling-grid"):
                for f in fields(SamplingParams):
                    yield Label(LABELS[f.name])
                    kind = "integer" if f.type in ("int", int) else "number"
                    yield Input(str(getattr(self.sampling, f.name)), type=kind, id=f"sampling-{f.name}", compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Save (Ctrl+S)", id="save", variant="primary")
                yield Button("Cancel (Esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_save(self) -> None:
        values = {}
        try:
            for f in fields(SamplingParams):
                text = self.query_one(f"#sampling-{f.name}", Input).value.strip()
                values[f.name] = int(text) if f.type in ("int", int) else float(text)
            self.dismiss(SamplingParams(**values).validate())
        except ValueError:
            self.notify(f"{LABELS[f.name]}: not a number", severity="error")
        except Cl3Error as ex:
            self.notify(str(ex), severity="error")

    def action_cancel(self) -> None:
        self.dismiss(None)
