"""Chat with a GGUF model: prompts from the model's own chat template, streaming replies, saved conversations.

The prompt is rendered from the GGUF's ``tokenizer.chat_template`` (or ``chat_template=`` NAME|FILE) with
llama-cpp-python's sandboxed Jinja2 formatter (the same rendering Hugging Face transformers does); a model without a
template whose vocabulary cl3 recognises (Llama-3, Chinese-LLaMA-2 / Alpaca-2) gets its family's format. A template
that refuses system messages gets none. Generation stops on every end-of-generation token of the model
(``<|eot_id|>`` for Llama-3); token text is decoded through llama.cpp with a buffer of the piece's size.
When a conversation no longer fits the context, the oldest turns are left out of the prompt (never the system prompt).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gguf
import jinja2

from . import paths
from .chat_templates import DEFAULT_SYSTEM_PROMPT, KNOWN_TEMPLATES, template_from_spec
from .errors import InputError, LlamaError, UnsupportedModelError
from .files import atomic_output
from .metadata import file_type_name

# --- messages and sampling ---------------------------------------------------------------------------------------------

@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    max_tokens: int = 512
    seed: int = -1  # -1: a new random seed for every reply

    def validate(self) -> SamplingParams:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top-p must be in (0, 1]"),
            (self.top_k >= 0, "top-k must be >= 0"),
            (0 <= self.min_p <= 1, "min-p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat penalty must be > 0"),
            (self.max_tokens > 0, "max tokens must be > 0"),
        ]
        for ok, problem in checks:
            if not ok:
                raise InputError(problem)
        return self


def template_messages(system_prompt: str, history: Sequence[Message]) -> list[dict[str, str]]:
    """The list of ``{"role", "content"}`` dicts a chat template expects: the system prompt first (if any)."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": m.role, "content": m.content} for m in history]


# --- streaming text from tokens ----------------------------------------------------------------------------------------

class TokenTextDecoder:
    """Turns generated tokens into text pieces, holding back bytes of a UTF-8 character split across tokens.

    A byte-level BPE vocabulary spells a CJK character it does not know as 2-4 single-byte tokens; decoding each token on
    its own would print replacement characters. The incremental decoder keeps the incomplete tail until it completes.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


# --- the model ---------------------------------------------------------------------------------------------------------

@dataclass
class Reply:
    """One streamed reply. Iterate it for text pieces; the statistics are filled in as it goes."""

    n_prompt_tokens: int
    n_ctx: int
    dropped_messages: int  # oldest history messages left out of the prompt to fit the context
    text: str = ""
    n_tokens: int = 0
    finish_reason: str | None = None  # "stop" (end-of-turn token), "length", "cancelled"
    seconds: float = 0.0  # from the first generated token to the last
    _pieces: Iterator[str] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        assert self._pieces is not None, "not a live reply"
        yield from self._pieces

    @property
    def tokens_per_second(self) -> float:
        return (self.n_tokens - 1) / self.seconds if self.n_tokens > 1 and self.seconds > 0 else 0.0

    @property
    def context_used(self) -> int:
        return self.n_prompt_tokens + self.n_tokens


class ChatModel:
    """A GGUF model loaded through llama-cpp-python, with its chat template and end-of-generation tokens."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_gpu_layers: int = -1, n_threads: int | None = None,
                 seed: int = -1, chat_template: str | os.PathLike | None = None):
        from llama_cpp import Llama

        from .llama import (
            budgeted_chat_templates,
            check_gguf_path,
            eog_token_ids,
            log_errors_since,
            mark_log,
            prepare_for_llama,
        )

        self.path = Path(path)
        check_gguf_path(self.path)
        override = template_from_spec(chat_template) if chat_template is not None else None
        if n_ctx < 0:
            raise InputError(f"context size must be >= 0 (0 = the model's training context), not {n_ctx}")
        self._check_template_budget(override)  # before the (long) load
        prepare_for_llama()
        mark = mark_log()
        try:
            with budgeted_chat_templates():  # Llama compiles the GGUF's own templates too, even with an override
                self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                                 n_threads=n_threads, seed=_llama_seed(seed), n_batch=512, verbose=False)
        except (ValueError, RuntimeError) as ex:
            raise InputError(f"llama.cpp cannot load {self.path}: {log_errors_since(mark) or ex}") from None
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self.architecture = self.metadata.get(gguf.Keys.General.ARCHITECTURE, "?")
        self.n_ctx = self.llm.n_ctx()
        self.eog_tokens = eog_token_ids(self.llm)
        self.bos_token_id = self.llm.token_bos()
        self.add_bos = self.metadata.get(gguf.Keys.Tokenizer.ADD_BOS, "true") != "false"
        self.template, self.template_source = self._chat_template(override)
        self._formatter = self._make_formatter()
        self.supports_system = self._accepts_system()

    # model facts for the status bar
    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def quant_type(self) -> str:
        file_type = self.metadata.get(gguf.Keys.General.FILE_TYPE)
        return file_type_name(int(file_type)) if file_type is not None else "?"

    def _token_text(self, token: int) -> str:
        from .llama import token_piece

        return "" if token < 0 else token_piece(self.llm, token, special=True).decode("utf-8", errors="replace")

    def _chat_template(self, override) -> tuple[str, str]:
        if override is not None:
            return override.text, f"--chat-template {override.name}"
        template = self.metadata.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        if template:
            return template, "gguf"
        from .export import read_gguf_info

        family = read_gguf_info(self.path).family
        if family is not None:
            return KNOWN_TEMPLATES[family], f"cl3: {family}"
        raise UnsupportedModelError(
            f"{self.path.name} has no chat template (tokenizer.chat_template) and cl3 does not recognise its "
            f"vocabulary; name a chat template ({', '.join(KNOWN_TEMPLATES)}, or a Jinja file)", param="chat_template")

    def _accepts_system(self) -> bool:
        """False for a template that raises on a system message (Gemma, some Mistral templates)."""
        try:
            self._formatter(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
            return True
        except (jinja2.TemplateError, ValueError, TypeError):
            return False

    def _check_template_budget(self, override) -> None:
        """Once, before the model loads: refuse the template chat will use (the override, else the GGUF's own) when
        it exceeds the render budget (template_budget), in one line. cl3's own family templates need no check."""
        from .export import read_gguf_info
        from .template_budget import check_chat_template

        info = read_gguf_info(self.path)
        template = override.text if override is not None else info.chat_template
        if template:
            where = (f"the chat template {override.name}" if override is not None
                     else f"tokenizer.chat_template of {self.path.name}")
            check_chat_template(template, bos_token=info.bos_token, eos_token=info.eos_token, where=where)

    def _make_formatter(self):
        from .template_budget import BudgetedChatFormatter  # llama-cpp-python's formatter, under a time/size budget

        try:
            return BudgetedChatFormatter(template=self.template, bos_token=self._token_text(self.bos_token_id),
                                         eos_token=self._token_text(self.llm.token_eos()), add_generation_prompt=True)
        except jinja2.TemplateError as ex:
            raise UnsupportedModelError(f"the chat template of {self.path.name} is not valid Jinja: {ex}") from None

    # prompts
    def format_prompt(self, system_prompt: str, history: Sequence[Message]) -> str:
        """The exact prompt text for a conversation, ending with the assistant's header."""
        if not self.supports_system:
            system_prompt = ""
        try:
            return self._formatter(messages=template_messages(system_prompt, history)).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as ex:  # raise_exception() in a template is a ValueError
            raise UnsupportedModelError(f"the chat template of {self.path.name} failed: {ex}") from None

    def tokenize_prompt(self, prompt: str) -> list[int]:
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        if self.add_bos and self.bos_token_id >= 0 and tokens[:1] != [self.bos_token_id]:
            tokens.insert(0, self.bos_token_id)
        return tokens

    def fit_prompt(self, system_prompt: str, history: Sequence[Message], reserve: int) -> tuple[list[int], int]:
        """Prompt tokens for the longest recent part of ``history`` that leaves ``reserve`` tokens for the reply.

        Whole turns are dropped from the front (a user message with the replies that follow it); the system prompt and
        the last user message always stay. Returns the tokens and how many history messages were left out.
        """
        system_only = self.tokenize_prompt(self.format_prompt(system_prompt, []))
        if len(system_only) >= self.n_ctx:
            raise InputError(f"the context ({self.n_ctx} tokens) is too small for the system prompt "
                             f"({len(system_only)} tokens); use a larger context or a shorter system prompt", param="n_ctx")
        reserve = max(1, min(reserve, self.n_ctx // 4))
        start = 0
        while True:
            tokens = self.tokenize_prompt(self.format_prompt(system_prompt, history[start:]))
            if len(tokens) + reserve <= self.n_ctx:
                return tokens, start
            next_start = _next_turn_start(history, start)
            if next_start is None:
                if len(tokens) < self.n_ctx:  # the last message fits, with less room for the reply
                    return tokens, start
                raise InputError(f"the message does not fit the context: {len(tokens)} prompt tokens, "
                                 f"n_ctx {self.n_ctx}; use a larger context or a shorter message", param="n_ctx")
            start = next_start

    # generation
    def reply(self, system_prompt: str, history: Sequence[Message], sampling: SamplingParams | None = None, *,
              should_stop: Callable[[], bool] | None = None) -> Reply:
        """Start the assistant's reply to ``history`` (which ends with a user message); iterate the result to stream it."""
        sampling = (sampling or SamplingParams()).validate()
        tokens, dropped = self.fit_prompt(system_prompt, history, sampling.max_tokens)
        reply = Reply(n_prompt_tokens=len(tokens), n_ctx=self.n_ctx, dropped_messages=dropped)
        reply._pieces = self._stream(tokens, sampling, reply, should_stop or (lambda: False))
        return reply

    def _stream(self, prompt_tokens: list[int], sampling: SamplingParams, reply: Reply,
                should_stop: Callable[[], bool]) -> Iterator[str]:
        budget = min(sampling.max_tokens, self.n_ctx - len(prompt_tokens))
        from .llama import token_piece

        decoder = TokenTextDecoder(lambda t: token_piece(self.llm, t))
        self.llm.set_seed(_llama_seed(sampling.seed))
        generator = self.llm.generate(prompt_tokens, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                                      temp=sampling.temperature, repeat_penalty=sampling.repeat_penalty)
        started = None
        reply.finish_reason = "length"
        try:
            while reply.n_tokens < budget:
                if should_stop():
                    reply.finish_reason = "cancelled"
                    break
                try:
                    token = next(generator)
                except RuntimeError as ex:  # llama_decode failed
                    raise LlamaError(f"generation failed: {ex}") from None
                now = time.perf_counter()
                started = started or now
                if token in self.eog_tokens:
                    reply.finish_reason = "stop"
                    break
                reply.n_tokens += 1
                reply.seconds = now - started
                piece = decoder.feed(token)
                if piece:
                    reply.text += piece
                    yield piece
            tail = decoder.flush()
            if tail:
                reply.text += tail
                yield tail
        finally:
            generator.close()

    def close(self) -> None:
        self.llm.close()


def default_system_prompt(path: str | os.PathLike) -> str:
    """The system prompt `cl3 chat` starts with: the Chinese-LLaMA-Alpaca authors' prompt for their models (as their
    own chat scripts do), else none, so the template's own behaviour (its default system prompt, if any) applies."""
    from .chat_templates import authors_model
    from .export import read_gguf_info

    info = read_gguf_info(path)
    return DEFAULT_SYSTEM_PROMPT if authors_model(info.name, info.family) else ""


def _next_turn_start(history: Sequence[Message], start: int) -> int | None:
    """Index of the next user message after ``start``: dropping up to there drops one whole turn."""
    return next((i for i in range(start + 1, len(history)) if history[i].role == "user"), None)


def _llama_seed(seed: int) -> int:
    import llama_cpp

    return llama_cpp.LLAMA_DEFAULT_SEED if seed < 0 else seed


# --- saved conversations -----------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Conversation:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    messages: list[Message] = field(default_factory=list)  # user and assistant messages, oldest first
    model: str = ""
    id: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)

    @property
    def title(self) -> str:
        first = next((m.content for m in self.messages if m.role == "user"), "")
        line = first.strip().splitlines()[0] if first.strip() else "(empty chat)"
        return line if len(line) <= 60 else line[:59] + "…"

    def to_dict(self) -> dict:
        return asdict(self) | {"title": self.title}

    @classmethod
    def from_dict(cls, data: dict) -> Conversation:
        return cls(system_prompt=data.get("system_prompt", ""), model=data.get("model", ""), id=data["id"],
                   messages=[Message(m["role"], m["content"]) for m in data.get("messages", [])],
                   created=data.get("created", ""), updated=data.get("updated", ""))

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", f"- model: `{self.model or '?'}`", f"- saved: {self.updated}", ""]
        if self.system_prompt:
            lines += ["## System", "", self.system_prompt, ""]
        for m in self.messages:
            lines += [f"## {m.role.capitalize()}", "", m.content, ""]
        return "\n".join(lines)


@dataclass
class ConversationSummary:
    id: str
    title: str
    updated: str
    n_messages: int
    model: str


class ConversationStore:
    """Conversations as one JSON file each under ``<data dir>/conversations``."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory else paths.data_dir() / "conversations"

    def _path(self, conversation_id: str) -> Path:
        if not conversation_id or any(c in conversation_id for c in "/\\") or conversation_id.startswith("."):
            raise InputError(f"not a conversation id: {conversation_id!r}")
        return self.directory / f"{conversation_id}.json"

    def save(self, conversation: Conversation) -> Path:
        conversation.updated = _now()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(conversation.id)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(conversation.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    def load(self, conversation_id: str) -> Conversation:
        path = self._path(conversation_id)
        try:
            return Conversation.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise InputError(f"no saved conversation {conversation_id!r} in {self.directory}") from None
        except (ValueError, KeyError, TypeError) as ex:
            raise InputError(f"saved conversation {path} is damaged: {ex}") from None

    def list(self) -> list[ConversationSummary]:
        """Saved conversations, most recently updated first; damaged files are skipped."""
        found = []
        for path in self.directory.glob("*.json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                found.append(ConversationSummary(data["id"], data.get("title", "?"), data.get("updated", ""),
                                                 len(data.get("messages", [])), data.get("model", "")))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(found, key=lambda s: s.updated, reverse=True)

    def delete(self, conversation_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(conversation_id).unlink()


def export_markdown(conversation: Conversation, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(conversation.to_markdown(), encoding="utf-8")
    return path
