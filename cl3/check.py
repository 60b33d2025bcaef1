"""`cl3 info --check`: what makes chats loop, get cut off or lose their prompt format, one line per finding with its fix.

Checks, from the GGUF's metadata and its vocabulary as llama.cpp loads them (no weights, nothing else read): the chat
template and
where it came from; that it renders; that the token closing an assistant turn is an end-of-generation token the GGUF
declares (EOS/EOT/EOM); that the prompt does not start with two BOS tokens; the stops an Ollama export writes; the BPE
pre-tokenizer; rope scaling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .chat_templates import KNOWN_TEMPLATES, describe_source, stop_candidates, template_from_spec
from .errors import InputError, UnsupportedModelError

LEVELS = ("ok", "note", "warning", "error")
FIX_TEMPLATE = f"cl3 convert SRC --chat-template NAME|FILE (NAME: {', '.join(KNOWN_TEMPLATES)})"


@dataclass(frozen=True)
class Finding:
    level: str  # ok, note, warning, error
    message: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.level}: {self.message}" + (f"; fix: {self.fix}" if self.fix else "")


def check_gguf(path: str | os.PathLike, chat_template: str | os.PathLike | None = None) -> list[Finding]:
    """Every finding for the GGUF at ``path`` (``chat_template``: NAME|FILE checked instead of the GGUF's own)."""
    from .export import read_gguf_info
    from .llama import Model, check_gguf_path
    from .metadata import read_metadata

    path = check_gguf_path(path)
    if chat_template is not None:
        template_from_spec(chat_template)  # a bad name or file is a usage error, not a finding
    meta = read_metadata(path)
    info = read_gguf_info(path)
    found = _pre_tokenizer(meta) + _rope(meta)
    missing = _missing_byte_token(info.tokenizer_model, info.tokens)
    if missing is not None:  # llama.cpp aborts the process when it tokenizes such a byte
        return [*found, Finding("error", f"the vocabulary has no token for byte {missing!r}: llama.cpp cannot "
                                         "tokenize text containing it", "cl3 convert SRC")]
    try:
        vocab = Model(path, vocab_only=True)
    except InputError as ex:
        return [*found, Finding("error", str(ex), "cl3 convert SRC")]
    with vocab:
        found += _template_checks(info, vocab, chat_template)
    return found


def _missing_byte_token(model: str | None, tokens: list[str]) -> str | None:
    """A byte the vocabulary cannot spell (llama.cpp's byte_to_token would throw), or None."""
    have = set(tokens)
    if model == "llama":
        return next((f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in have and chr(b) not in have), None)
    if model == "gpt2":
        from gguf.vocab import bytes_to_unicode

        return next((f"<0x{b:02X}>" for b, ch in bytes_to_unicode().items() if ch not in have), None)
    return None


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level == "error" for f in findings)


def _template_checks(info, vocab, chat_template) -> list[Finding]:
    from .export import _render, analyze_chat_template, check_template_budget, stop_sequences

    found = []
    if chat_template is not None:
        choice = template_from_spec(chat_template)
        template, where = choice.text, f"the user (--chat-template {choice.name})"
    elif info.chat_template:
        template, where = info.chat_template, describe_source(info.template_source, info.template_name)
    elif info.family:
        template, where = KNOWN_TEMPLATES[info.family], f"cl3's knowledge of the {info.family} family"
        found.append(Finding("warning", f"the GGUF has no chat template; cl3 chat and export use the {info.family} "
                                        "template, other runtimes have none", "cl3 convert SRC (embeds it)"))
    else:
        return [Finding("warning", "no chat template: chat front-ends cannot format a conversation", FIX_TEMPLATE)]
    check_template_budget(info, template, chat_template)  # a template over the render budget: one error line
    found.append(Finding("ok", f"chat template from {where}"))

    bos, eos = info.bos_token, info.eos_token
    user = [{"role": "user", "content": "cl3mark0x"}]
    try:
        rendered = _render(template, user, bos, eos)
    except UnsupportedModelError as ex:
        return [*found, Finding("error", f"the chat template fails on a one-message conversation "
                                         f"({getattr(ex, 'reason', ex)})", FIX_TEMPLATE)]
    try:
        _render(template, [{"role": "system", "content": "s"}, *user], bos, eos)
        found.append(Finding("ok", "the chat template renders conversations with and without a system prompt"))
    except UnsupportedModelError as ex:
        found.append(Finding("warning", f"the chat template refuses a system prompt "
                                        f"({getattr(ex, 'reason', ex)}); cl3 chat and the Ollama export leave it out"))

    try:
        layout = analyze_chat_template(template, bos_token=bos, eos_token=eos, add_bos=info.add_bos)
    except UnsupportedModelError as ex:
        layout = None
        found.append(Finding("warning", f"no Ollama TEMPLATE: {ex}"))
    found += _end_of_turn(info, vocab, template, layout)
    found += _double_bos(info, vocab, rendered)
    if layout is not None:
        found.append(Finding("ok", "stops an Ollama export writes: " + ", ".join(stop_sequences(layout, info))))
    return found


def _between_turns(template: str, info, layout) -> str | None:
    """The template text after an assistant message, up to the next user message."""
    from .export import _pieces

    if layout is not None:
        return layout.assistant_post + layout.user_pre_later
    try:
        return _pieces(template, "uau", info.bos_token, info.eos_token)[2]
    except UnsupportedModelError:
        return None


def _end_of_turn(info, vocab, template: str, layout) -> list[Finding]:
    between = _between_turns(template, info, layout)
    if between is None:
        return []
    specials = set(info.control_tokens) | {t for t in (info.bos_token, info.eos_token) if t}
    safe, _ = stop_candidates(between, specials, exclude=(info.bos_token,))
    if not safe:
        return [Finding("warning", "the chat template closes an assistant turn with no marker; only EOS "
                                   f"({info.eos_token!r}) ends a reply")]
    closer = safe[0]
    ids = vocab.tokenize(closer, add_special=False, parse_special=True).tolist()
    if len(ids) != 1:
        return [Finding("error", f"the chat template closes an assistant turn with {closer!r}, which is {len(ids)} "
                                 "tokens of the vocabulary, not one end-of-generation token: replies run on",
                        FIX_TEMPLATE)]
    tid = ids[0]
    if tid not in info.eos_token_ids:
        guessed = "; llama.cpp guesses it from its text, other runtimes do not" if vocab.is_eog(tid) else ""
        return [Finding("error", f"{closer} ({tid}) closes an assistant turn in the chat template but is not an "
                                 f"end-of-generation token of the vocabulary (EOS/EOT){guessed}",
                        "cl3 convert SRC (declares it as tokenizer.ggml.eot_token_id)")]
    return [Finding("ok", f"{closer} ({tid}) closes an assistant turn and ends generation")]


def _double_bos(info, vocab, rendered: str) -> list[Finding]:
    """The prompt as llama.cpp builds it from the template: one leading BOS text dropped when the model adds BOS
    itself (common/chat.cpp), then tokenized with BOS added."""
    if vocab.bos < 0 or not info.bos_token:
        return []
    text = rendered
    if vocab.add_bos and text.startswith(info.bos_token):
        text = text[len(info.bos_token):]
    ids = vocab.tokenize(text, add_special=True, parse_special=True).tolist()
    if ids[:2] == [vocab.bos, vocab.bos]:
        return [Finding("error", f"the prompt starts with two BOS tokens: the chat template writes {info.bos_token} "
                                 f"at its start {'after' if vocab.add_bos else 'and'} "
                                 f"tokenizer.ggml.add_bos_token = {str(vocab.add_bos).lower()}", FIX_TEMPLATE)]
    if vocab.add_bos and rendered.startswith(info.bos_token):
        return [Finding("note", f"the chat template writes {info.bos_token} and the model adds BOS: llama.cpp, cl3 chat "
                                "and the Ollama export keep one; a runtime that tokenizes the rendered prompt with BOS "
                                "added feeds two")]
    return []


def _pre_tokenizer(meta) -> list[Finding]:
    if meta.tokenizer_model != "gpt2":
        return []
    pre = meta.pre_tokenizer
    if pre in (None, "", "default"):
        return [Finding("error", f"the BPE vocabulary has no pre-tokenizer (tokenizer.ggml.pre = {pre or 'missing'}): "
                                 "llama.cpp splits text the GPT-2 way, unlike the model's tokenizer",
                        "cl3 convert SRC (identifies it from tokenizer.json) or --pre-tokenizer NAME")]
    return [Finding("ok", f"pre-tokenizer {pre}")]


def _rope(meta) -> list[Finding]:
    hp = meta.hparams

    def number(key: str) -> float | None:
        try:
            return float(hp[key])
        except (KeyError, TypeError, ValueError):
            return None

    kind = hp.get("rope.scaling.type")
    factor = number("rope.scaling.factor")
    base = number("rope.freq_base")
    orig = hp.get("rope.scaling.original_context_length")
    if kind in (None, "none"):
        return [Finding("ok", f"rope: base {base:g}, no scaling" if base else "rope: no scaling")]
    if kind not in ("linear", "yarn", "longrope"):
        return [Finding("error", f"rope scaling type {kind!r} is unknown to llama.cpp", "cl3 convert SRC")]
    if not factor or factor <= 0:
        return [Finding("error", f"rope scaling {kind} without a factor (rope.scaling.factor)", "cl3 convert SRC")]
    if kind == "yarn" and not orig:
        return [Finding("error", "YaRN rope scaling without rope.scaling.original_context_length", "cl3 convert SRC")]
    extra = f", original context {orig}" if orig else ""
    return [Finding("ok", f"rope: {kind} ×{factor:g}{extra}, context_length {hp.get('context_length')}")]
