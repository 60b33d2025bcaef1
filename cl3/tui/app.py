"""The `cl3 chat` Textual application: settings, the loaded model, the conversation being shown and the store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from ..chat import DEFAULT_SYSTEM_PROMPT, ChatModel, Conversation, ConversationStore, SamplingParams
from ..errors import Cl3Error
from .screens import ChatScreen


class ChatApp(App[None]):
    CSS_PATH = "cl3.tcss"
    TITLE = "cl3 chat"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_gpu_layers: int = 0,
                 n_threads: int | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 sampling: SamplingParams | None = None, store: ConversationStore | None = None,
                 resume: str | None = None, export_dir: str | os.PathLike | None = None,
                 model: ChatModel | None = None, chat_template: str | None = None) -> None:
        super().__init__()
        self.chat_template = chat_template  # NAME|FILE instead of the GGUF's own
        self.model_path = Path(model_path)
        self.n_ctx, self.n_gpu_layers, self.n_threads = n_ctx, n_gpu_layers, n_threads
        self.sampling = sampling or SamplingParams()
        self.store = store or ConversationStore()
        self.export_dir = Path(export_dir) if export_dir else Path.cwd()
        self.model = model  # a preloaded model (tests, `-p`), else loaded by a worker
        self.conversation = self.store.load(resume) if resume else Conversation(system_prompt=system_prompt)
        self.load_error: Cl3Error | None = None  # set when the model could not be loaded (the app then exits)
        self.replies_done = 0

    def get_default_screen(self) -> ChatScreen:
        return ChatScreen()

    def save(self) -> None:
        """Save the conversation being shown (called after every message)."""
        if self.conversation.messages:
            try:
                self.store.save(self.conversation)
            except (Cl3Error, OSError) as ex:  # a full disk must not end the chat
                self.notify(f"could not save the chat: {ex}", severity="error")
