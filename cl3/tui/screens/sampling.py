"""The sampling-parameters panel."""

from __future__ import annotations

from dataclasses import fields

from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import Input, Label

from ...chat import SamplingParams
from ...errors import Cl3Error
from .dialog import SaveCancelDialog

LABELS = {
    "temperature": "Temperature (0 = greedy)",
    "top_p": "Top-p",
    "top_k": "Top-k (0 = off)",
    "min_p": "Min-p",
    "repeat_penalty": "Repeat penalty",
    "max_tokens": "Max tokens per reply",
    "seed": "Seed (-1 = random)",
}


class SamplingScreen(SaveCancelDialog):
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
            yield from self.buttons()

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
