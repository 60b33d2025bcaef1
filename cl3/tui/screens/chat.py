"""The main screen: the conversation, the message box, the status bar and the footer.

llama.cpp runs in thread workers (model loading, generation); they talk to the widgets only by posting messages.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header

from ...chat import ChatModel, Conversation, Message, Reply, SamplingParams, export_markdown
from ...errors import Cl3Error
from ..widgets import ChatMessage, Notice, PromptInput, StatusBar
from .help import HelpScreen
from .history import HistoryScreen
from .sampling import SamplingScreen
from .system_prompt import SystemPromptScreen

if TYPE_CHECKING:
    from ..app import ChatApp


PIECE_INTERVAL = 1 / 30  # seconds: streamed text reaches the screen at most this often


# Messages from the worker thread to the screen.

@dataclass
class ModelLoaded(TextualMessage):
    model: ChatModel


@dataclass
class ModelFailed(TextualMessage):
    error: Cl3Error


@dataclass
class ReplyStarted(TextualMessage):
    reply: Reply


@dataclass
class ReplyPiece(TextualMessage):
    text: str
    n_tokens: int
    context_used: int
    tokens_per_second: float


@dataclass
class ReplyDone(TextualMessage):
    reply: Reply


@dataclass
class ReplyFailed(TextualMessage):
    error: str


class ChatScreen(Screen):
    # short labels and a compact footer: every key fits in 80 columns (F1 explains them all)
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+j,alt+enter", "send", "Send", key_display="^j"),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Redo"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("f2", "edit_system", "Sys"),
        Binding("f3", "sampling", "Temp"),
        Binding("f4", "history", "Open"),
        Binding("f5", "export", "Export"),
        Binding("f1", "help", "Help"),
    ]

    generating: reactive[bool] = reactive(False, bindings=True)
    model_ready: reactive[bool] = reactive(False, bindings=True)

    def __init__(self) -> None:
        super().__init__()
        self._stop = threading.Event()
        self._reply_widget: ChatMessage | None = None
        self._dropped_shown = 0

    @property
    def chat_app(self) -> ChatApp:
        return self.app  # type: ignore[return-value]

    @property
    def conversation(self) -> Conversation:
        return self.chat_app.conversation

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="conversation")
        yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer(show_command_palette=False, compact=True)

    async def on_mount(self) -> None:
        self.query_one("#conversation").anchor()
        await self.show_conversation()
        self.query_one("#conversation").loading = True
        self.query_one(PromptInput).focus()
        self.load_model()

    def on_unmount(self) -> None:
        self._stop.set()  # quitting mid-reply: let the generation thread end at its next token

    # --- model loading ---

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_model(self) -> None:
        app = self.chat_app
        try:
            model = app.model or ChatModel(app.model_path, n_ctx=app.n_ctx, n_gpu_layers=app.n_gpu_layers,
                                           n_threads=app.n_threads, chat_template=app.chat_template)
            model.fit_prompt(self.conversation.system_prompt, [], reserve=1)  # the system prompt must fit
        except Cl3Error as ex:
            self.post_message(ModelFailed(ex))
            return
        self.post_message(ModelLoaded(model))

    def on_model_loaded(self, event: ModelLoaded) -> None:
        app = self.chat_app
        app.model = event.model
        self.conversation.model = self.conversation.model or event.model.file_name
        self.query_one("#conversation").loading = False
        status = self.query_one(StatusBar)
        status.state, status.n_ctx = "ready", event.model.n_ctx
        status.model_file, status.quant_type = event.model.file_name, event.model.quant_type
        status.context_used = self._prompt_tokens()
        self.sub_title = f"{event.model.file_name} · {event.model.quant_type} · template: {event.model.template_source}"
        self.model_ready = True

    def on_model_failed(self, event: ModelFailed) -> None:
        """Nothing to chat with: leave the TUI; `cl3 chat` prints the one-line error."""
        self.chat_app.load_error = event.error
        self.app.exit(return_code=1)

    def _prompt_tokens(self) -> int:
        model = self.chat_app.model
        if model is None:
            return 0
        try:
            return len(model.tokenize_prompt(model.format_prompt(self.conversation.system_prompt,
                                                                 self.conversation.messages)))
        except Cl3Error:
            return 0

    # --- the conversation view ---

    async def show_conversation(self) -> None:
        view = self.query_one("#conversation", VerticalScroll)
        await view.remove_children()
        system = ChatMessage("system", self.conversation.system_prompt, id="system-message")
        system.display = bool(self.conversation.system_prompt)  # no empty "System" block; F2 can still set one
        widgets = [system]
        widgets += [ChatMessage(m.role, m.content) for m in self.conversation.messages]
        await view.mount_all(widgets)
        self._dropped_shown = 0
        self.query_one(StatusBar).context_used = self._prompt_tokens()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True if self.generating else None
        if action in ("send", "regenerate", "new_chat", "history"):
            return True if self.model_ready and not self.generating else None
        return True

    # --- actions ---

    async def action_send(self) -> None:
        if not self.model_ready or self.generating:
            return
        box = self.query_one(PromptInput)
        text = box.text.strip()
        if not text:
            return
        box.clear()
        self.conversation.messages.append(Message("user", text))
        await self.query_one("#conversation").mount(ChatMessage("user", text))
        self.chat_app.save()
        await self._start_reply()

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()

    async def action_regenerate(self) -> None:
        if not self.model_ready or self.generating or not self.conversation.messages:
            return
        if self.conversation.messages[-1].role == "assistant":
            self.conversation.messages.pop()
            last = self.query(ChatMessage).last()
            if last.role == "assistant":
                await last.remove()
        if self.conversation.messages and self.conversation.messages[-1].role == "user":
            await self._start_reply()

    async def action_new_chat(self) -> None:
        if self.generating:
            return
        self.chat_app.conversation = Conversation(system_prompt=self.conversation.system_prompt,
                                                  model=self.conversation.model)
        await self.show_conversation()
        self.query_one(PromptInput).focus()

    def action_edit_system(self) -> None:
        self.app.push_screen(SystemPromptScreen(self.conversation.system_prompt), self._set_system_prompt)

    async def _set_system_prompt(self, text: str | None) -> None:
        if text is None or text == self.conversation.system_prompt:
            return
        model = self.chat_app.model
        if model is not None:
            try:
                model.fit_prompt(text, [], reserve=1)
            except Cl3Error as ex:
                self.notify(str(ex), severity="error")
                return
        self.conversation.system_prompt = text
        system = self.query_one("#system-message", ChatMessage)
        await system.set_content(text)
        system.display = bool(text)
        if self.conversation.messages:
            self.chat_app.save()
        self.query_one(StatusBar).context_used = self._prompt_tokens()

    def action_sampling(self) -> None:
        self.app.push_screen(SamplingScreen(self.chat_app.sampling), self._set_sampling)

    def _set_sampling(self, sampling: SamplingParams | None) -> None:
        if sampling is not None:
            self.chat_app.sampling = sampling
            self.notify(f"sampling: temperature {sampling.temperature}, top-p {sampling.top_p}, top-k {sampling.top_k}, "
                        f"repeat penalty {sampling.repeat_penalty}, max tokens {sampling.max_tokens}")

    def action_history(self) -> None:
        if self.generating:
            return
        self.app.push_screen(HistoryScreen(self.chat_app.store.list()), self._open_conversation)

    async def _open_conversation(self, conversation_id: str | None) -> None:
        if conversation_id is None:
            return
        try:
            self.chat_app.conversation = self.chat_app.store.load(conversation_id)
        except Cl3Error as ex:
            self.notify(str(ex), severity="error")
            return
        await self.show_conversation()

    def action_export(self) -> None:
        path = self.chat_app.export_dir / f"cl3-chat-{self.conversation.id}.md"
        try:
            export_markdown(self.conversation, path)
        except (Cl3Error, OSError) as ex:
            self.notify(f"export failed: {ex}", severity="error")
            return
        self.notify(f"exported to {path}")

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    # --- generation ---

    async def _start_reply(self) -> None:
        self._reply_widget = ChatMessage("assistant")
        await self.query_one("#conversation").mount(self._reply_widget)
        self._stop.clear()
        self.generating = True
        self.query_one(StatusBar).state = "generating…"
        self.generate(self.conversation.system_prompt, list(self.conversation.messages), replace(self.chat_app.sampling))

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(self, system_prompt: str, history: list[Message], sampling: SamplingParams) -> None:
        model = self.chat_app.model
        assert model is not None
        try:
            reply = model.reply(system_prompt, history, sampling, should_stop=self._stop.is_set)
            self.post_message(ReplyStarted(reply))
            pending: list[str] = []
            last_post = 0.0
            for piece in reply:
                pending.append(piece)
                if time.monotonic() - last_post >= PIECE_INTERVAL:  # a fast model must not flood the UI
                    self.post_message(ReplyPiece("".join(pending), reply.n_tokens, reply.context_used,
                                                 reply.tokens_per_second))
                    pending.clear()
                    last_post = time.monotonic()
            if pending:
                self.post_message(ReplyPiece("".join(pending), reply.n_tokens, reply.context_used,
                                             reply.tokens_per_second))
        except Cl3Error as ex:
            self.post_message(ReplyFailed(str(ex)))
            return
        self.post_message(ReplyDone(reply))

    async def on_reply_started(self, event: ReplyStarted) -> None:
        reply = event.reply
        status = self.query_one(StatusBar)
        status.context_used = reply.n_prompt_tokens
        if reply.dropped_messages > self._dropped_shown:
            self._dropped_shown = reply.dropped_messages
            notice = Notice(f"Context full ({reply.n_ctx} tokens): the {reply.dropped_messages} oldest messages are "
                            f"left out of the prompt from now on; the system prompt is kept.", kind="trim")
            await self.query_one("#conversation").mount(notice, before=self._reply_widget)

    async def on_reply_piece(self, event: ReplyPiece) -> None:
        if self._reply_widget is not None:
            await self._reply_widget.write(event.text)
        status = self.query_one(StatusBar)
        status.context_used, status.tokens_per_second = event.context_used, event.tokens_per_second

    async def on_reply_done(self, event: ReplyDone) -> None:
        reply = event.reply
        note = {"cancelled": "(stopped)", "length": "(reply cut at the token limit)"}.get(reply.finish_reason or "", "")
        if self._reply_widget is not None:
            await self._reply_widget.finish(note)
        self.conversation.messages.append(Message("assistant", reply.text))
        self.chat_app.save()
        status = self.query_one(StatusBar)
        status.tokens_per_second, status.context_used = reply.tokens_per_second, reply.context_used
        status.state = "ready"
        self._reply_widget = None
        self.generating = False
        self.chat_app.replies_done += 1

    async def on_reply_failed(self, event: ReplyFailed) -> None:
        if self._reply_widget is not None:
            await self._reply_widget.remove()
            self._reply_widget = None
        await self.query_one("#conversation").mount(Notice(f"error: {event.error}", kind="error"))
        self.query_one(StatusBar).state = "ready"
        self.generating = False
