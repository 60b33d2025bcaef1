"""One line under the conversation: model state, speed of the last reply, context use, model file and quant type."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static


class StatusBar(Static):
    state: reactive[str] = reactive("loading model…")
    tokens_per_second: reactive[float | None] = reactive(None)
    context_used: reactive[int] = reactive(0)
    n_ctx: reactive[int] = reactive(0)
    model_file: reactive[str] = reactive("")
    quant_type: reactive[str] = reactive("")

    def render(self) -> str:
        speed = f"{self.tokens_per_second:.1f} tok/s" if self.tokens_per_second is not None else "– tok/s"
        ctx = f"ctx {self.context_used}/{self.n_ctx}" if self.n_ctx else "ctx –"
        model = f"{self.model_file} {self.quant_type}".strip() or "–"
        return f" {self.state} │ {speed} │ {ctx} │ {model}"
