"""What cl3 knows about chat templates: the families' own templates, the Chinese-LLaMA-Alpaca authors' system prompt,
recognising a family from its vocabulary, and which texts are safe as stop sequences.

Used by convert (a checkpoint without a template gets its family's), chat (GGUFs converted elsewhere) and export
(SYSTEM, stops). The Alpaca-2 template follows the authors' own prompt building (ymcui/Chinese-LLaMA-Alpaca-2,
scripts/inference/gradio_demo.py and scripts/openai_server_demo/openai_api_server.py): the first turn is
``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{instruction} [/INST]``, always with a system prompt (default below), each
answer is `` {answer}</s>`` and each later turn ``<s>[INST] {instruction} [/INST]``; the tokenizer adds the first BOS.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, UsageError

# The Chinese-LLaMA-Alpaca-2/-3 authors' default system prompt (scripts/inference/*.py, prompts/alpaca-2.txt).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"

ALPACA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '" + DEFAULT_SYSTEM_PROMPT + "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first -%}{{ '[INST] <<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Meta's Llama-3-Instruct template (as shipped in tokenizer_config.json of Llama-3-Chinese-8B-Instruct).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Meta's Llama-2-chat template.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

KNOWN_TEMPLATES = {
    "chinese-alpaca-2": ALPACA2_CHAT_TEMPLATE,
    "llama-3-instruct": LLAMA3_CHAT_TEMPLATE,
    "llama-2-chat": LLAMA2_CHAT_TEMPLATE,
    "chatml": CHATML_CHAT_TEMPLATE,
}

# GGUF keys cl3 writes beside tokenizer.chat_template: where the template came from and its name.
SOURCE_KEY = "cl3.chat_template.source"  # "checkpoint", "family" (cl3's knowledge) or "user"
NAME_KEY = "cl3.chat_template.name"  # the family or template name, or the user's file name

# --------------------------------------------------------------------------------------------------------------------
# Families recognised from their vocabulary

CHINESE_LLAMA2_VOCAB_SIZE = 55296  # Chinese-LLaMA-2 / Alpaca-2 (README: 词表大小 55,296)
LLAMA2_VOCAB_SIZE = 32000
LLAMA3_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _is_cjk(text: str) -> bool:
    return any("CJK" in unicodedata.name(c, "") for c in text)


def family_from_vocab(model: str | None, tokens: list[str]) -> str | None:
    """The chat family a vocabulary belongs to, or None.

    - chinese-alpaca-2: a SentencePiece vocabulary of exactly 55,296 pieces (padding excluded) laid out like Llama-2's
      (<unk>, <s>, </s> first) whose pieces past Llama-2's 32,000 are mostly Chinese: Chinese-LLaMA-2 and Alpaca-2
      share it (the base model has no template of its own either);
    - llama-3-instruct: a byte-level BPE vocabulary with Llama-3's header and end-of-turn tokens.
    """
    if model == "llama":
        real = [t for t in tokens if not (t.startswith("[PAD") and t.endswith("]"))]
        if len(real) == CHINESE_LLAMA2_VOCAB_SIZE and real[:3] == ["<unk>", "<s>", "</s>"]:
            extension = real[LLAMA2_VOCAB_SIZE:]
            if sum(_is_cjk(t) for t in extension) >= len(extension) // 2:
                return "chinese-alpaca-2"
    if model == "gpt2" and set(LLAMA3_HEADER_TOKENS) <= set(tokens):
        return "llama-3-instruct"
    return None


_AUTHORS_NAME = re.compile(r"chinese[-_ ]?(llama|alpaca|mixtral)|llama[-_ ]?3[-_ ]?chinese", re.IGNORECASE)


def authors_model(name: str | None, family: str | None) -> bool:
    """True for the Chinese-LLaMA-Alpaca authors' models, whose default system prompt is DEFAULT_SYSTEM_PROMPT:
    the Alpaca-2 vocabulary, or a model named like theirs (Llama-3-Chinese-8B-Instruct shares Meta's vocabulary)."""
    return family == "chinese-alpaca-2" or bool(name and _AUTHORS_NAME.search(name))


@dataclass(frozen=True)
class TemplateChoice:
    text: str
    source: str  # "checkpoint", "family" or "user"
    name: str | None  # family / template name, or the user's file name


def template_from_spec(spec: str | os.PathLike) -> TemplateChoice:
    """--chat-template NAME|FILE: a known template by name, else a Jinja file."""
    key = str(spec)
    if key in KNOWN_TEMPLATES:
        return TemplateChoice(KNOWN_TEMPLATES[key], "user", key)
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"chat template {key!r} is neither a file nor a known template "
                         f"({', '.join(KNOWN_TEMPLATES)})", param="chat_template")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as ex:
        raise InputError(f"cannot read the chat template {path}: {ex}") from None
    if not text.strip():
        raise InputError(f"the chat template file {path} is empty")
    return TemplateChoice(text, "user", path.name)


def describe_source(source: str | None, name: str | None) -> str:
    """Where a GGUF's template came from, in words for `cl3 info`."""
    if source == "checkpoint":
        return "the checkpoint (tokenizer_config.json)"
    if source == "family":
        return f"cl3's knowledge of the {name} family"
    if source == "user":
        return f"the user (--chat-template {name})"
    return "the GGUF (not recorded: converted by another tool)"


# --------------------------------------------------------------------------------------------------------------------
# Stop sequences: special tokens, or template markup that ordinary text does not contain

# Tag-shaped markup a template writes: <|...|>, <｜...｜>, <tag>, </tag>, [INST]-style brackets.
_TAG = re.compile(r"<\|[^|<>\n]*\|>|<｜[^｜<>\n]*｜>|</?[A-Za-z_][^<>\s]*>|\[/?[A-Z_]{2,}\]")
# Punctuation of ordinary prose (English and Chinese); every other non-alphanumeric character is markup.
_PROSE_PUNCTUATION = set(".,:;!?'\"()-–—…，。：；！？、“”‘’（）《》「」")


def is_ordinary_text(text: str, special_tokens: frozenset[str] | set[str] = frozenset()) -> bool:
    """True when a stop candidate could occur in an ordinary reply: it is not a special token and it is words and
    prose punctuation only ("You", "GPT4 Correct User:") or markup without any letter ("###", ">")."""
    if text in special_tokens:
        return False
    markup = any(not (c.isalnum() or c.isspace() or c in _PROSE_PUNCTUATION) for c in text)
    return not (markup and any(c.isalnum() for c in text))


def markers(text: str, special_tokens: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The markers in a piece of template text, in order: each line is cut before every special token or tag; a piece
    that starts with one stands for that token alone, any other piece for its whole (stripped) text."""
    specials = sorted((t for t in special_tokens if t), key=len, reverse=True)
    out = []
    for line in text.splitlines():
        starts = {m.start() for m in _TAG.finditer(line)}
        for tok in specials:
            at = line.find(tok)
            while at >= 0:
                starts.add(at)
                at = line.find(tok, at + len(tok))
        cuts = sorted(starts | {0, len(line)})
        for a, b in zip(cuts, cuts[1:]):
            piece = line[a:b].strip()
            if not piece:
                continue
            lead = next((t for t in specials if piece.startswith(t)), None)
            if lead is None and (m := _TAG.match(piece)):
                lead = m.group(0)
            out.append(lead or piece)
    return out


def stop_candidates(between_turns: str, special_tokens: frozenset[str] | set[str] = frozenset(),
                    exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """From the template text between an assistant message and the next user message: the markers safe as stops, in
    order (the first one closes the turn), and those rejected as ordinary text. ``exclude``: never stops (BOS)."""
    safe, rejected = [], []
    for m in markers(between_turns, special_tokens):
        if m in exclude or m in safe:
            continue
        (rejected if is_ordinary_text(m, special_tokens) else safe).append(m)
    return safe, rejected
