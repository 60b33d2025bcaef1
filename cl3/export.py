"""Hand a GGUF to the desktop tools people already run: an Ollama Modelfile and LM Studio's models folder.

The Ollama TEMPLATE is not looked up by name. The GGUF's Jinja chat template is rendered on probe conversations whose
message texts are unique markers; the literal text between the markers gives the prompt's layout (what comes before and
after a system, user and assistant message, and the generation prompt). That layout is then checked against the Jinja
rendering of ordinary 1-4 turn conversations with and without a system prompt, and only then written out in Ollama's
Go-template syntax. A template that raises on a system message, drops it or places it where no per-message layout can
is translated for conversations without one (the TEMPLATE leaves system messages out, and says so). A template whose
output does not follow such a layout even then is refused with a clear error.

Stops are special tokens or template markup (`[INST]`, `### Instruction:`), never ordinary words: Ollama cuts a reply at
a stop anywhere in it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .chat_templates import (
    DEFAULT_SYSTEM_PROMPT,
    NAME_KEY,
    SOURCE_KEY,
    authors_model,
    family_from_vocab,
    is_ordinary_text,
    stop_candidates,
)
from .errors import InputError, OutputError, UnsupportedModelError, UsageError
from .files import atomic_output, check_new_output, make_folder, output_directory

# --------------------------------------------------------------------------------------------------------------------
# What the export needs from the GGUF


@dataclass
class GgufInfo:
    path: Path
    architecture: str
    name: str | None
    organization: str | None
    chat_template: str | None
    bos_token: str
    eos_token: str
    end_of_turn_tokens: list[str]  # EOT / EOM token texts (EOS kept separately)
    add_bos: bool
    context_length: int | None
    sampling: dict[str, float | int]  # general.sampling.* keys, by their GGUF names
    license: str | None
    license_name: str | None
    license_link: str | None
    control_tokens: frozenset[str] = field(default_factory=frozenset)
    tokenizer_model: str | None = None
    family: str | None = None  # chat family known to cl3 (chat_templates.family_from_vocab)
    template_source: str | None = None  # cl3.chat_template.source: checkpoint, family, user; None: not recorded
    template_name: str | None = None
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)  # declared end-of-generation ids: EOS, EOT, EOM
    tokens: list[str] = field(default_factory=list, repr=False)


def read_gguf_info(path: str | os.PathLike) -> GgufInfo:
    """The metadata the export uses (from cl3.metadata; no tensor data is read)."""
    from .metadata import read_metadata

    m = read_metadata(path)
    texts, ids = m.special_texts, m.special_ids
    tokens = m.token_texts()
    source, template_name = m.values.get(SOURCE_KEY), m.values.get(NAME_KEY)
    family = template_name if source == "family" else family_from_vocab(m.tokenizer_model, tokens)
    return GgufInfo(
        path=m.path, architecture=m.architecture or "llama", name=m.name, organization=m.organization,
        chat_template=m.chat_template, bos_token=texts.get("bos", ""), eos_token=texts.get("eos", ""),
        end_of_turn_tokens=[texts[k] for k in ("eot", "eom") if k in texts], add_bos=m.effective_add_bos,
        context_length=m.context_length, sampling=m.sampling, license=m.license, license_name=m.license_name,
        license_link=m.license_link, control_tokens=m.control_tokens, tokenizer_model=m.tokenizer_model,
        family=family, template_source=source, template_name=template_name,
        eos_token_ids=frozenset(ids[k] for k in ("eos", "eot", "eom") if k in ids), tokens=tokens)


# --------------------------------------------------------------------------------------------------------------------
# Jinja chat templates


def render_chat_template(template: str, messages: list[dict], *, bos_token: str, eos_token: str,
                         add_generation_prompt: bool = True) -> str:
    """Render a chat template exactly as llama-cpp-python's server does (same Jinja environment and variables)."""
    return _formatter(template, bos_token, eos_token, add_generation_prompt)(messages=messages).prompt


@functools.lru_cache(maxsize=8)
def _formatter(template: str, bos_token: str, eos_token: str, add_generation_prompt: bool):
    from .template_budget import BudgetedChatFormatter  # llama-cpp-python's formatter, under a time/size budget

    return BudgetedChatFormatter(template, eos_token=eos_token, bos_token=bos_token,
                                 add_generation_prompt=add_generation_prompt)


@dataclass(frozen=True)
class ChatLayout:
    """A chat prompt as literal text around each message; what an Ollama TEMPLATE can express."""

    family: str
    system_pre: str
    system_post: str
    user_pre_first: str  # the conversation opens with a user message
    user_pre_after_system: str
    user_pre_later: str  # after an assistant message
    user_post: str
    assistant_pre: str
    assistant_post: str
    generation: str  # after the last message: the generation prompt
    default_system: str | None  # what the template inserts when there is no system message
    bos_in_template: bool  # the Jinja output starts with BOS (Ollama's tokenizer adds it instead)
    notes: tuple[str, ...] = ()
    supports_system: bool = True  # False: translated for conversations without a system message only
    # Mistral-v0.3 / Mixtral-8x22B templates put the system text at the start of the LAST user message, followed by
    # this separator, instead of in a block of its own (system_pre/system_post unused then).
    system_in_last_user: str | None = None

    def render(self, messages: list[dict]) -> str:
        """The prompt this layout gives (without the leading BOS); the Python twin of ollama_template()."""
        out = []
        prev = ""
        if self.default_system is not None and not any(m["role"] == "system" for m in messages):
            out += [self.system_pre, self.default_system, self.system_post]
            prev = "system"
        in_last_user = self.system_in_last_user is not None
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")  # Ollama's .System
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "system" and (not self.supports_system or in_last_user):
                continue
            if role == "system":
                out += [self.system_pre, content, self.system_post]
            elif role == "user":
                pre = {"system": self.user_pre_after_system, "assistant": self.user_pre_later}.get(prev, self.user_pre_first)
                if in_last_user and system and i == len(messages) - 1:
                    content = system + self.system_in_last_user + content
                out += [pre, content, self.user_post]
            elif role == "assistant":
                out += [self.assistant_pre, content, self.assistant_post]
            prev = role
        out.append(self.generation)
        return "".join(out)


_MARK = "cl3mark{}x"


def _probe(roles: str) -> list[dict]:
    names = {"s": "system", "u": "user", "a": "assistant"}
    return [{"role": names[r], "content": _MARK.format(i)} for i, r in enumerate(roles)]


class _Untranslatable(UnsupportedModelError):
    """A refusal, with the short reason the system-less fallback quotes."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _render(template: str, msgs: list[dict], bos: str, eos: str) -> str:
    """render_chat_template, with a template's own errors turned into a one-line refusal."""
    import jinja2

    try:
        return render_chat_template(template, msgs, bos_token=bos, eos_token=eos)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as ex:
        raise _Untranslatable(f"the chat template fails on a {'-'.join(m['role'] for m in msgs)} conversation "
                              f"({ex}); cl3 cannot translate it into an Ollama TEMPLATE",
                              f"the template raises {str(ex)!r} on them") from None


def _pieces(template: str, roles: str, bos: str, eos: str) -> list[str]:
    """Render a probe conversation and cut the output at the message markers: head, glue..., tail."""
    msgs = _probe(roles)
    text = _render(template, msgs, bos, eos)
    pieces, pos = [], 0
    for i in range(len(msgs)):
        mark = _MARK.format(i)
        at = text.find(mark, pos)
        if at < 0 or text.count(mark) != 1:
            raise _Untranslatable("the chat template does not place each message's text exactly once, in order; "
                                  "cl3 cannot translate it into an Ollama TEMPLATE",
                                  "the template leaves them out or moves them")
        pieces.append(text[pos:at])
        pos = at + len(mark)
    pieces.append(text[pos:])
    return pieces


def _split_suffix(text: str, suffix: str) -> tuple[str, str] | None:
    if suffix and text.endswith(suffix):
        return text[: len(text) - len(suffix)], suffix
    return None


def _common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


def _common_suffix(a: str, b: str) -> str:
    return os.path.commonprefix([a[::-1], b[::-1]])[::-1]


# Ordinary conversations the layout must reproduce exactly (Chinese and English text, inner newlines and spaces).
_TURNS = [("你好，请介绍一下你自己。", "你好！我是一个人工智能助手。"),
          ("What is GGUF?", "A file format for\nllama.cpp models."),
          ("把上面的话翻译成中文。", "GGUF 是 llama.cpp 模型的文件格式。"),
          ("Thanks!  Bye.", "再见！")]
_SYSTEM = "You are a terse assistant.\n只用中文回答。"


def check_conversations(with_system: bool = True) -> list[list[dict]]:
    """1-4 user turns, each without and (unless with_system is False) with a system prompt, ending with a user
    message."""
    convs = []
    for n in range(1, 5):
        msgs = []
        for i in range(n):
            msgs.append({"role": "user", "content": _TURNS[i][0]})
            if i < n - 1:
                msgs.append({"role": "assistant", "content": _TURNS[i][1]})
        convs.append(msgs)
        if with_system:
            convs.append([{"role": "system", "content": _SYSTEM}] + msgs)
    return convs


def analyze_chat_template(template: str, *, bos_token: str, eos_token: str, add_bos: bool = True) -> ChatLayout:
    """Find the per-message layout of a Jinja chat template by probing it; raise UnsupportedModelError if it has none.

    A template that has a layout only for conversations without a system message gets that one
    (``supports_system`` False, with a note saying why)."""
    try:
        return _analyze(template, bos_token, eos_token, add_bos, with_system=True)
    except UnsupportedModelError as ex:
        try:
            layout = _analyze(template, bos_token, eos_token, add_bos, with_system=False)
        except UnsupportedModelError:
            raise ex from None
        inside = _system_in_last_user(template, layout, bos_token, eos_token)
        if inside is not None:
            return inside
        reason = getattr(ex, "reason", "no per-message layout places them")
        note = f"system messages are not supported ({reason}); the TEMPLATE leaves them out"
        return replace(layout, notes=(note, *layout.notes))


def _system_in_last_user(template: str, layout: ChatLayout, bos: str, eos: str) -> ChatLayout | None:
    """``layout`` (for conversations without a system message) extended by a system text that opens the last user
    message (Mistral v0.3, Mixtral-8x22B: "[INST] SYSTEM\\n\\nUSER[/INST]"), when the template does exactly that on
    every check conversation; else None."""
    if layout.default_system is not None:
        return None
    try:
        head, separator, tail = _pieces(template, "su", bos, eos)
    except UnsupportedModelError:
        return None
    strip = bos if layout.bos_in_template else ""
    if head.removeprefix(strip) != layout.user_pre_first or tail != layout.user_post + layout.generation:
        return None
    candidate = replace(layout, system_in_last_user=separator, supports_system=True)
    for msgs in check_conversations(with_system=True):
        try:
            expected = _render(template, msgs, bos, eos).removeprefix(strip)
        except UnsupportedModelError:
            return None
        if candidate.render(msgs) != expected:
            return None
    return candidate


def _analyze(template: str, bos_token: str, eos_token: str, add_bos: bool, *, with_system: bool) -> ChatLayout:
    u = _pieces(template, "u", bos_token, eos_token)
    uau = _pieces(template, "uau", bos_token, eos_token)
    # without system messages: a stand-in where the system block would be (nothing), so the code below is shared
    su = _pieces(template, "su", bos_token, eos_token) if with_system else [u[0], ""]

    bos_in_template = bool(bos_token) and u[0].startswith(bos_token) and (not with_system or su[0].startswith(bos_token))
    notes = []
    if bos_in_template and add_bos:
        u[0], su[0], uau[0] = (p.removeprefix(bos_token) for p in (u[0], su[0], uau[0]))
    elif add_bos and bos_token:
        notes.append("the chat template does not start with BOS but the model adds one; Ollama will add it too")

    head_user, tail_user = u[0], u[1]
    head_system, glue_su = (su[0], su[1]) if with_system else ("", "")
    glue_ua, glue_au = uau[1], uau[2]

    # A template may insert its own system prompt when the conversation has none.
    default_system = None
    if head_user != uau[0]:
        raise UnsupportedModelError("the chat template's opening depends on the number of turns; "
                                    "cl3 cannot translate it into an Ollama TEMPLATE")
    if head_system and head_user.startswith(head_system) and head_user.endswith(glue_su) \
            and len(head_user) >= len(head_system) + len(glue_su):
        default_system = head_user[len(head_system): len(head_user) - len(glue_su)]

    # The text that opens a user turn, wherever it appears.
    if default_system is None:
        user_pre = head_user
    else:  # the opening is hidden behind the default system block: find it from a later turn
        header = head_system.replace("system", "user") if "system" in head_system else None
        if header and glue_su.endswith(header) and glue_au.endswith(header):
            user_pre = header  # <|im_start|>user\n after <|im_start|>system\n
        else:  # [INST] opens both the system block and later turns
            user_pre = next((glue_au[k:] for k in range(len(glue_au)) if head_system.startswith(glue_au[k:])),
                            _common_suffix(glue_au, glue_su))
    sp = _split_suffix(glue_su, user_pre)
    system_post, user_pre_after_system = sp if sp else (glue_su, "")
    if not with_system:
        system_post, user_pre_after_system = "", user_pre

    # Between a user message and the assistant's text, and after the last user message.
    assistant_pre = ""
    if "user" in user_pre:
        header = user_pre.replace("user", "assistant")
        if glue_ua.endswith(header) and tail_user.endswith(header) \
                and glue_ua[: -len(header)] == tail_user[: -len(header)]:
            assistant_pre = header
    if assistant_pre:
        user_post = glue_ua[: -len(assistant_pre)]
        generation = tail_user[len(user_post):]
    else:
        user_post = _common_prefix(glue_ua, tail_user)
        assistant_pre, generation = glue_ua[len(user_post):], tail_user[len(user_post):]

    ap = _split_suffix(glue_au, user_pre)
    assistant_post, user_pre_later = ap if ap else (glue_au, "")
    user_pre_first = head_user if default_system is None else user_pre_after_system

    layout = ChatLayout(
        family=_family(head_system + user_pre + user_post + assistant_pre),
        system_pre=head_system, system_post=system_post,
        user_pre_first=user_pre_first, user_pre_after_system=user_pre_after_system, user_pre_later=user_pre_later,
        user_post=user_post, assistant_pre=assistant_pre, assistant_post=assistant_post, generation=generation,
        default_system=default_system, bos_in_template=bos_in_template and add_bos, notes=tuple(notes),
        supports_system=with_system,
    )

    strip = bos_token if layout.bos_in_template else ""
    for msgs in check_conversations(with_system):
        expected = _render(template, msgs, bos_token, eos_token)
        if strip:
            expected = expected.removeprefix(strip)
        got = layout.render(msgs)
        if got != expected:
            at = len(_common_prefix(got, expected))
            roles = "-".join(m["role"] for m in msgs)
            raise _Untranslatable(
                f"the chat template is not a per-message layout cl3 can translate into an Ollama TEMPLATE "
                f"(a {roles} conversation differs at character {at}: expected {expected[at:at + 30]!r}, "
                f"the translation gives {got[at:at + 30]!r})", "the template places them where no per-message "
                "layout can, e.g. inside a user turn")

    if "strftime_now" in template:
        note = "the chat template writes today's date into the prompt; the TEMPLATE keeps the date of the export"
        layout = replace(layout, notes=(*layout.notes, note))
    padded = [{"role": "user", "content": "  padded  "}]
    if "  padded  " not in _render(template, padded, bos_token, eos_token):
        note = "the chat template trims message text; Ollama passes it unchanged"
        layout = replace(layout, notes=(*layout.notes, note))
    return layout


def _family(markup: str) -> str:
    if "<|start_header_id|>" in markup:
        return "llama3-instruct"
    if "<|im_start|>" in markup:
        return "chatml"
    if "[INST]" in markup and "<<SYS>>" in markup:
        return "llama2-chat"
    return "per-message layout"


# --------------------------------------------------------------------------------------------------------------------
# Ollama Go templates


class _GoTemplate:
    """Builds Go-template text: literals verbatim, actions on their own lines only where trimming cannot eat text."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, str, bool]] = []  # ("text", literal, _) or ("action", code, on_own_line)

    def text(self, s: str) -> None:
        if s:
            self.parts.append(("text", s, False))

    def action(self, code: str, newline: bool = True) -> None:
        self.parts.append(("action", code, newline))

    def __str__(self) -> str:
        out: list[str] = []
        runs: list[tuple[str, str, bool]] = []
        for kind, value, newline in self.parts:  # merge adjacent literals before deciding how to write them
            if kind == "text" and runs and runs[-1][0] == "text":
                runs[-1] = ("text", runs[-1][1] + value, False)
            else:
                runs.append((kind, value, newline))
        for i, (kind, value, newline) in enumerate(runs):
            if kind == "text":
                after_action = i + 1 < len(runs)
                if "{{" in value or (after_action and value.endswith("{")):  # would open an action: a string constant
                    out.append("{{ " + json.dumps(value, ensure_ascii=False) + " }}")
                else:
                    out.append(value)
            elif newline and (not out or not out[-1][-1].isspace()):  # "{{-" trims only the newline written here
                out.append(("\n" if out else "") + "{{- " + value + " }}")
            else:
                out.append("{{ " + value + " }}")
        return "".join(out)


def _user_pre_branches(t: _GoTemplate, layout: ChatLayout) -> None:
    """The text opening a user turn when it depends on the previous message's role, with as few branches as needed."""
    first, after_system, later = layout.user_pre_first, layout.user_pre_after_system, layout.user_pre_later
    if first == later:
        cases, default = [("eq $prev \"system\"", after_system)], first
    elif first == after_system:
        cases, default = [("eq $prev \"assistant\"", later)], first
    elif after_system == later:
        cases, default = [("eq $prev \"\"", first)], later
    else:
        cases, default = [("eq $prev \"system\"", after_system), ("eq $prev \"assistant\"", later)], first
    if len(cases) == 1 and not default:  # "if X then text" reads better than "if not X then nothing else text"
        t.action("if " + cases[0][0], newline=False)
        t.text(cases[0][1])
    elif len(cases) == 1 and not cases[0][1]:
        t.action("if ne" + cases[0][0][2:], newline=False)  # eq -> ne
        t.text(default)
    else:
        for i, (cond, text) in enumerate(cases):
            t.action(("if " if i == 0 else "else if ") + cond, newline=False)
            t.text(text)
        t.action("else", newline=False)
        t.text(default)
    t.action("end", newline=False)


def ollama_template(layout: ChatLayout) -> str:
    """The layout in Ollama's TEMPLATE syntax (Go text/template over .System and .Messages)."""
    t = _GoTemplate()
    pres = {layout.user_pre_first, layout.user_pre_after_system, layout.user_pre_later}
    track_prev = len(pres) > 1
    if track_prev:
        t.action('$prev := ""')
    if layout.default_system is not None:
        t.action("if not .System")
        t.text(layout.system_pre)
        t.text(layout.default_system)
        t.text(layout.system_post)
        if track_prev:
            t.action('$prev = "system"', newline=False)
        t.action("end", newline=False)
    in_last_user = layout.system_in_last_user is not None
    t.action("range $i, $_ := .Messages" if in_last_user else "range .Messages")
    if layout.supports_system and not in_last_user:
        t.action('if eq .Role "system"')
        t.text(layout.system_pre)
        t.action(".Content", newline=False)
        t.text(layout.system_post)
        t.action('else if eq .Role "user"')
    else:  # system messages are left out (or go into the last user message)
        t.action('if eq .Role "user"')
    if track_prev:
        _user_pre_branches(t, layout)
    else:
        t.text(layout.user_pre_first)
    if in_last_user:  # .System (all system messages) opens the last message when that is a user message
        t.action("if and $.System (eq (len (slice $.Messages $i)) 1)", newline=False)
        t.action("$.System", newline=False)
        t.text(layout.system_in_last_user)
        t.action("end", newline=False)
    t.action(".Content", newline=False)
    t.text(layout.user_post)
    t.action('else if eq .Role "assistant"')
    t.text(layout.assistant_pre)
    t.action(".Content", newline=False)
    t.text(layout.assistant_post)
    t.action("end")
    if track_prev and layout.supports_system and not in_last_user:
        t.action("$prev = .Role")
    elif track_prev:
        t.action('if ne .Role "system"')
        t.action("$prev = .Role", newline=False)
        t.action("end", newline=False)
    t.action("end")
    t.text(layout.generation)
    return str(t)


# --------------------------------------------------------------------------------------------------------------------
# The Modelfile

_OLLAMA_SAMPLING = {  # GGUF general.sampling.* name -> Ollama PARAMETER
    "temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "penalty_repeat": "repeat_penalty", "penalty_last_n": "repeat_last_n",
    "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
}
_HF_SAMPLING = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                "repetition_penalty": "repeat_penalty"}


def sampling_parameters(info: GgufInfo, generation_config: dict | None = None) -> dict[str, float | int]:
    """Ollama sampling PARAMETERs: the GGUF's general.sampling.* keys first, then HF generation_config.json."""
    params: dict[str, float | int] = {}
    for key, val in info.sampling.items():
        if key in _OLLAMA_SAMPLING:
            params[_OLLAMA_SAMPLING[key]] = val
    if generation_config:
        if generation_config.get("do_sample") is False:
            params.setdefault("temperature", 0)
        else:
            for key, name in _HF_SAMPLING.items():
                val = generation_config.get(key)
                if isinstance(val, (int, float)) and not isinstance(val, bool):
                    params.setdefault(name, val)
    order = list(_OLLAMA_SAMPLING.values())
    return dict(sorted(params.items(), key=lambda kv: order.index(kv[0])))


def load_generation_config(path: str | os.PathLike) -> dict:
    from .hf import read_json

    path = Path(path)
    return read_json(path / "generation_config.json" if path.is_dir() else path, "generation config")


def stop_sequences(layout: ChatLayout, info: GgufInfo) -> list[str]:
    """Every text that ends the assistant's turn: the marker closing it in the template, EOT/EOM, EOS, and the marker
    opening the next user turn (so a model that runs on into another turn stops there). Only special tokens and
    template markup qualify: Ollama cuts a reply at a stop anywhere, so an ordinary word would cut ordinary replies."""
    return _stops(layout, info)[0]


def _stops(layout: ChatLayout, info: GgufInfo) -> tuple[list[str], list[str]]:
    """The stops, and notes on markers left out because ordinary text contains them."""
    specials = set(info.control_tokens) | {t for t in (info.bos_token, info.eos_token, *info.end_of_turn_tokens) if t}
    safe, rejected = stop_candidates(layout.assistant_post + layout.user_pre_later, specials, exclude=(info.bos_token,))
    stops: list[str] = []
    for cand in (*safe[:1], *info.end_of_turn_tokens, info.eos_token):
        if cand and cand not in stops and cand != info.bos_token and not is_ordinary_text(cand, specials):
            stops.append(cand)
    opening = next((m for m in safe[1:] if m not in stops), None)  # the marker opening the next turn
    if opening:
        stops.append(opening)
    notes = [] if opening else [f"no stop for {m!r}: ordinary text contains it, and Ollama would cut replies there"
                                for m in rejected]
    return stops, notes


# Ollama's Modelfile parser (parser/parser.go) has no escapes: a comment ends at a line break; a value ends at the first
# line break where the text so far, without the characters it drops (all but printable ones, space, tab and line
# breaks) and outer white space, is a complete quoted string ("..." or """...""") or not quoted at all. So a value is
# written only when it cannot end early; GGUF and user text never becomes a command.


def _as_ollama_reads(text: str) -> str:
    """``text`` without the characters Ollama's parser drops."""
    return "".join(c for c in text if c.isprintable() or c in " \t\r\n")


def _comment(text: str) -> str:
    """Text for a `#` comment line: line breaks and other control characters become spaces."""
    return re.sub(r"\s+", " ", "".join(c if c.isprintable() else " " for c in text)).strip()


def _quoted_block(keyword: str, value: str) -> str:
    if '"""' in _as_ollama_reads(value):
        raise UnsupportedModelError(f'the {keyword} text contains """, which an Ollama Modelfile cannot hold (Ollama '
                                    f"would read the rest as Modelfile commands)", param=_PARAM.get(keyword))
    return f'{keyword} """{value}"""'


_PARAM = {"SYSTEM": "system"}


def _param_value(name: str, v: float | str) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise UnsupportedModelError(f"the {name} parameter {v!r} is not a number or text")
    if isinstance(v, str):
        if '"' in v or _as_ollama_reads(v) != v or "\n" in v or "\r" in v:
            raise UnsupportedModelError(f"the {name} parameter {v!r} cannot be written in an Ollama Modelfile (a quote, "
                                        "line break or control character)")
        return '"' + v + '"'
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


def _from_value(path: str) -> str:
    if _as_ollama_reads(path) != path or "\n" in path or "\r" in path:
        raise UnsupportedModelError(f"the path {path!r} cannot be written in an Ollama Modelfile (a line break or "
                                    "control character); rename the file")
    return f'"{path}"' if path != path.strip() or path.startswith('"') else path


def license_text(info: GgufInfo, license_file: str | os.PathLike | None = None) -> str | None:
    if license_file is not None:
        try:
            return Path(license_file).read_text(encoding="utf-8").strip()
        except OSError as ex:
            raise InputError(f"cannot read the license file {license_file}: {ex.strerror}") from None
    lines = [x for x in (info.license_name or info.license, info.license_link) if x]
    return "\n".join(lines) or None


def modelfile_text(*, from_path: str, layout: ChatLayout, info: GgufInfo, system: str | None,
                   parameters: dict[str, float | int], num_ctx: int | None, license: str | None,
                   notes: list[str] | None = None) -> str:
    checked = "with and without a system prompt" if layout.supports_system else "without a system prompt"
    lines = [f"# Ollama Modelfile for {_comment(info.name or info.path.stem)}, written by cl3.",
             f"# TEMPLATE: {_comment(layout.family)}, translated from the GGUF's tokenizer.chat_template and checked "
             "against it",
             f"# on 1-4 turn conversations {checked}."]
    lines += [f"# Note: {_comment(n)}." for n in (layout.notes if notes is None else notes)]
    lines += [f"FROM {_from_value(from_path)}", "", _quoted_block("TEMPLATE", ollama_template(layout)), ""]
    if system:
        lines += [_quoted_block("SYSTEM", system), ""]
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    for stop in stop_sequences(layout, info):
        lines.append(f"PARAMETER stop {_param_value('stop', stop)}")
    for name, val in parameters.items():
        lines.append(f"PARAMETER {name} {_param_value(name, val)}")
    if license:
        lines += ["", _quoted_block("LICENSE", license)]
    return "\n".join(lines) + "\n"


@dataclass
class OllamaExport:
    modelfile: Path
    name: str
    layout: ChatLayout
    create_command: list[str]
    system: str | None = None  # the SYSTEM written
    stops: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the layout's notes and what the export left out


def ollama_model_name(info: GgufInfo) -> str:
    """A name `ollama create` accepts, from the GGUF's name or file name."""
    raw = (info.name or info.path.stem).lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", raw).strip("-._") or "model"
    return name


def default_system(layout: ChatLayout, info: GgufInfo) -> str | None:
    """The SYSTEM an export writes by default: none (the template's own behaviour, including a default system prompt
    it inserts itself), except the Chinese-LLaMA-Alpaca authors' prompt for their models when the template has none."""
    if layout.supports_system and layout.default_system is None and authors_model(info.name, info.family):
        return DEFAULT_SYSTEM_PROMPT
    return None


def export_template(info: GgufInfo, chat_template: str | os.PathLike | None = None) -> tuple[str, list[str]]:
    """The Jinja template an export translates: --chat-template NAME|FILE, the GGUF's, else its family's."""
    from .chat_templates import KNOWN_TEMPLATES, template_from_spec

    if chat_template is not None:
        return template_from_spec(chat_template).text, []
    if info.chat_template:
        return info.chat_template, []
    if info.family:
        return KNOWN_TEMPLATES[info.family], [f"the GGUF has no chat template; cl3 used the {info.family} template it "
                                              f"knows for this vocabulary"]
    raise UnsupportedModelError(f"{info.path.name} has no tokenizer.chat_template; name a chat template (a known "
                                "name or a Jinja file) to derive the Ollama TEMPLATE from", param="chat_template")


def check_template_budget(info: GgufInfo, template: str, chat_template: str | os.PathLike | None) -> None:
    """Refuse, in one line naming where it came from, a template that exceeds the render budget (template_budget)."""
    from .template_budget import check_chat_template

    where = (f"the chat template {chat_template}" if chat_template is not None
             else f"tokenizer.chat_template of {info.path.name}" if info.chat_template
             else f"cl3's {info.family} chat template")
    check_chat_template(template, bos_token=info.bos_token, eos_token=info.eos_token, where=where)


def export_ollama(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, name: str | None = None,
                  system: str | None = None, generation_config: str | os.PathLike | None = None,
                  license_file: str | os.PathLike | None = None, num_ctx: int | None = None,
                  chat_template: str | os.PathLike | None = None, force: bool = False) -> OllamaExport:
    """Write DIR/<gguf name>.Modelfile (DIR defaults to the GGUF's folder, so each GGUF has its own); return what
    `ollama create` needs. An existing Modelfile is replaced only with ``force``.

    system: the SYSTEM text; None: default_system(); "": none.
    chat_template: a known template name or a Jinja file to use instead of the GGUF's tokenizer.chat_template."""
    info = read_gguf_info(gguf_path)
    template, notes = export_template(info, chat_template)
    check_template_budget(info, template, chat_template)
    layout = analyze_chat_template(template, bos_token=info.bos_token, eos_token=info.eos_token,
                                   add_bos=info.add_bos)
    if system is None:
        system = default_system(layout, info)
    elif not system:
        system = None
    elif not layout.supports_system:
        raise UsageError(f"the chat template of {info.path.name} does not support a system prompt "
                         f"({layout.notes[0]}); export without one", param="system")
    stops, stop_notes = _stops(layout, info)
    notes = [*notes, *layout.notes, *stop_notes]
    out = output_directory(out_dir) if out_dir is not None else info.path.parent
    gguf_abs, out_abs = info.path.resolve(), out.resolve()
    try:
        from_path = "./" + gguf_abs.relative_to(out_abs).as_posix()
    except ValueError:
        from_path = str(gguf_abs)
    if num_ctx is not None and num_ctx <= 0:
        raise UsageError("num_ctx must be positive")
    params = sampling_parameters(info, load_generation_config(generation_config) if generation_config else None)
    text = modelfile_text(from_path=from_path, layout=layout, info=info, system=system, parameters=params,
                          num_ctx=num_ctx or info.context_length, license=license_text(info, license_file),
                          notes=notes)
    modelfile = out / f"{info.path.name.removesuffix('.gguf')}.Modelfile"
    check_new_output(modelfile, force)
    with atomic_output(modelfile) as tmp:
        tmp.write_text(text, encoding="utf-8")
    name = name or ollama_model_name(info)
    return OllamaExport(modelfile=modelfile, name=name, layout=layout,
                        create_command=["ollama", "create", name, "-f", str(modelfile)], system=system, stops=stops,
                        notes=notes)


def ollama_create(export: OllamaExport) -> int | None:
    """Run `ollama create` (its progress shows on the terminal) when the binary is on PATH: its exit code, or None."""
    exe = shutil.which("ollama")
    if exe is None:
        return None
    return subprocess.run([exe, *export.create_command[1:]], check=False).returncode


# --------------------------------------------------------------------------------------------------------------------
# LM Studio


def lmstudio_models_dir() -> Path:
    """LM Studio's models folder: $CL3_LMSTUDIO_MODELS_DIR, else ~/.lmstudio/models (older releases: ~/.cache/lm-studio)."""
    env = os.environ.get("CL3_LMSTUDIO_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    legacy = home / ".cache" / "lm-studio" / "models"
    current = home / ".lmstudio" / "models"
    return legacy if legacy.is_dir() and not current.is_dir() else current


def _folder_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text, flags=re.UNICODE).strip("-.") or "model"


def export_lmstudio(gguf_path: str | os.PathLike, models_dir: str | os.PathLike | None = None, *,
                    publisher: str | None = None, model: str | None = None, mode: str = "copy",
                    force: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Place the GGUF as MODELS/publisher/model/file.gguf; mode is copy, hardlink or symlink."""
    from .metadata import read_metadata

    info = read_metadata(gguf_path)
    if mode not in ("copy", "hardlink", "symlink"):
        raise UsageError(f"unknown mode {mode!r} (copy, hardlink or symlink)")
    root = Path(models_dir).expanduser() if models_dir is not None else lmstudio_models_dir()
    publisher = _folder_name(publisher or info.organization or "local")
    model = _folder_name(model or (info.name or info.path.stem) + "-GGUF")
    target_dir = root / publisher / model
    try:
        make_folder(target_dir)
    except OSError as ex:
        raise OutputError(f"cannot create {target_dir}: {ex.strerror}") from None
    target = target_dir / info.path.name
    if target.exists() and target.resolve() == info.path.resolve():
        return target
    check_new_output(target, force)
    with atomic_output(target) as tmp:
        tmp.unlink()
        try:
            if mode == "hardlink":
                os.link(info.path, tmp)
            elif mode == "symlink":
                os.symlink(info.path.resolve(), tmp)
            else:
                _copy(info.path, tmp, progress)
        except OSError as ex:
            raise OutputError(f"cannot {mode} {info.path} to {target}: {ex.strerror}") from None
    return target


def _copy(src: Path, dst: Path, progress: Callable[[int, int], None] | None) -> None:
    total, done = src.stat().st_size, 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(16 << 20):
            fo.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
