"""cl3.chat on the real tiny GGUF models: prompts, end-of-turn tokens, UTF-8 streaming, context trimming, storage."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jinja2.sandbox
import pytest
from tokenizers import Tokenizer

from cl3.chat import (
    DEFAULT_SYSTEM_PROMPT,
    ChatModel,
    Conversation,
    ConversationStore,
    Message,
    SamplingParams,
    TokenTextDecoder,
    default_system_prompt,
    export_markdown,
)
from cl3.errors import InputError, UnsupportedModelError
from tests.conftest import run_cl3

CONVERSATION = [
    Message("user", "你好"),
    Message("assistant", "你好！有什么可以帮你的吗？"),
    Message("user", "What is quantization? 什么是量化？"),
]

# The Llama-3-Instruct format written out by hand (the authors' example: system, user "你好", assistant).
LLAMA3_BY_HAND = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. 你是一个乐于助人的助手。<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n你好！有什么可以帮你的吗？<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is quantization? 什么是量化？<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def gguf_string(path: Path, key: str) -> str | None:
    reader = gguf.GGUFReader(path)
    field = reader.get_field(key)
    return None if field is None else field.contents()


def token_text(path: Path, key: str) -> str:
    tokens = gguf.GGUFReader(path).get_field("tokenizer.ggml.tokens").contents()
    return tokens[gguf.GGUFReader(path).get_field(key).contents()]


def render_reference(path: Path, system: str, history: list[Message]) -> str:
    """Jinja rendering of the GGUF's template the way transformers' apply_chat_template does it."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    messages = [{"role": "system", "content": system}] + [{"role": m.role, "content": m.content} for m in history]
    return env.from_string(gguf_string(path, "tokenizer.chat_template")).render(
        messages=messages, add_generation_prompt=True, bos_token=token_text(path, "tokenizer.ggml.bos_token_id"),
        eos_token=token_text(path, "tokenizer.ggml.eos_token_id"))


def without_metadata(src: Path, dst: Path, *keys: str) -> Path:
    """A copy of a GGUF file without some metadata keys (gguf-py's gguf_new_metadata)."""
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    copy_with_new_metadata(reader, gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess), {}, list(keys))
    return dst


@pytest.fixture(scope="module")
def model(tiny_llama3_gguf) -> ChatModel:
    return ChatModel(tiny_llama3_gguf, n_ctx=512)


# --- prompts ---

def test_prompt_is_the_gguf_template_and_the_llama3_instruct_format(model, tiny_llama3_gguf):
    prompt = model.format_prompt(DEFAULT_SYSTEM_PROMPT, CONVERSATION)
    assert model.template_source == "gguf"
    assert prompt == render_reference(tiny_llama3_gguf, DEFAULT_SYSTEM_PROMPT, CONVERSATION)
    assert prompt == LLAMA3_BY_HAND

    tokens = model.tokenize_prompt(prompt)
    specials = {name: model.llm.tokenize(name.encode(), add_bos=False, special=True)
                for name in ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>")}
    assert all(len(ids) == 1 for ids in specials.values())
    assert tokens[0] == specials["<|begin_of_text|>"][0] and tokens.count(tokens[0]) == 1  # one BOS, not two
    assert tokens.count(specials["<|eot_id|>"][0]) == 4
    assert tokens.count(specials["<|start_header_id|>"][0]) == 5


def test_model_without_template_falls_back_to_llama3_instruct(tiny_llama3_gguf, tmp_path):
    bare = without_metadata(tiny_llama3_gguf, tmp_path / "no-template.gguf", "tokenizer.chat_template")
    assert gguf_string(bare, "tokenizer.chat_template") is None
    fallback = ChatModel(bare, n_ctx=256)
    assert fallback.template_source == "cl3: llama-3-instruct"
    assert fallback.format_prompt(DEFAULT_SYSTEM_PROMPT, CONVERSATION) == LLAMA3_BY_HAND


def test_llama2_template_renders_like_jinja(tiny_spm_gguf):
    spm = ChatModel(tiny_spm_gguf, n_ctx=256)
    history = CONVERSATION
    assert spm.format_prompt("Be brief.", history) == render_reference(tiny_spm_gguf, "Be brief.", history)
    assert "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n你好 [/INST]" in spm.format_prompt("Be brief.", history)


def test_no_template_and_not_llama3_is_a_clear_error(tiny_spm_gguf, tmp_path):
    bare = without_metadata(tiny_spm_gguf, tmp_path / "spm-no-template.gguf", "tokenizer.chat_template")
    with pytest.raises(UnsupportedModelError, match="no chat template"):
        ChatModel(bare, n_ctx=256)


def test_stops_on_every_end_of_generation_token(model, tiny_llama3_dir):
    vocab = Tokenizer.from_file(str(tiny_llama3_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert vocab["<|eot_id|>"] in model.eog_tokens
    assert vocab["<|end_of_text|>"] in model.eog_tokens
    assert vocab["<|start_header_id|>"] not in model.eog_tokens


# --- streaming ---

def test_utf8_split_across_byte_tokens_streams_whole_characters(model, tiny_llama3_dir):
    text = "你好，世界！量化让大模型在电脑上运行。"
    tokens = model.llm.tokenize(text.encode(), add_bos=False)
    # the same ids as the checkpoint's own tokenizer (tokenizers library)
    hf = Tokenizer.from_file(str(tiny_llama3_dir / "tokenizer.json"))
    assert tokens == hf.encode(text, add_special_tokens=False).ids
    token_bytes = [model.llm.detokenize([t]) for t in tokens]
    assert b"".join(token_bytes) == text.encode()
    split = [b for b in token_bytes if not _decodes(b)]
    assert split, "the test needs characters split across tokens"

    decoder = TokenTextDecoder(lambda t: model.llm.detokenize([t]))
    pieces = [decoder.feed(t) for t in tokens] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # a naive per-token decode would have produced replacement characters
    assert "\ufffd" in "".join(b.decode("utf-8", errors="replace") for b in token_bytes)


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_reply_streams_and_is_reproducible_with_a_seed(model):
    sampling = SamplingParams(seed=42, max_tokens=24)
    first = model.reply(DEFAULT_SYSTEM_PROMPT, CONVERSATION, sampling)
    pieces = list(first)
    assert len(pieces) >= 1 and "".join(pieces) == first.text
    assert 1 <= first.n_tokens <= 24
    assert first.finish_reason in ("stop", "length")
    assert first.n_tokens == 24 or first.finish_reason == "stop"
    assert first.context_used == first.n_prompt_tokens + first.n_tokens
    assert first.n_prompt_tokens == len(model.llm.tokenize(LLAMA3_BY_HAND.encode(), add_bos=False, special=True))
    again = model.reply(DEFAULT_SYSTEM_PROMPT, CONVERSATION, sampling)
    assert "".join(again) == first.text


def test_reply_ends_at_the_first_end_of_turn_token(model, tiny_llama3_dir):
    vocab = Tokenizer.from_file(str(tiny_llama3_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    end_tokens = {vocab["<|eot_id|>"], vocab["<|end_of_text|>"]}
    for seed in range(1, 100):
        sampling = SamplingParams(seed=seed, max_tokens=300)
        reply = model.reply(DEFAULT_SYSTEM_PROMPT, CONVERSATION, sampling)
        "".join(reply)
        if reply.finish_reason == "stop":
            break
    else:
        pytest.fail("no seed ends its reply within 300 tokens")
    # the same sampling straight from llama-cpp-python, not stopping anywhere
    model.llm.set_seed(seed)
    raw = []
    for token in model.llm.generate(model.llm.tokenize(LLAMA3_BY_HAND.encode(), add_bos=False, special=True),
                                    top_k=40, top_p=0.95, min_p=0.05, temp=0.8, repeat_penalty=1.1):
        raw.append(token)
        if len(raw) > reply.n_tokens:
            break
    assert raw[reply.n_tokens] in end_tokens and not end_tokens & set(raw[:reply.n_tokens])
    assert model.llm.detokenize(raw[:reply.n_tokens]).decode("utf-8", errors="replace") == reply.text


def test_stop_keeps_the_partial_reply(model):
    pieces: list[str] = []
    reply = model.reply(DEFAULT_SYSTEM_PROMPT, CONVERSATION, SamplingParams(seed=1, max_tokens=200),
                        should_stop=lambda: len(pieces) >= 3)
    for piece in reply:  # should_stop looks at the pieces while they stream
        pieces.append(piece)  # noqa: PERF402
    assert reply.finish_reason == "cancelled"
    assert len(pieces) == 3 and reply.text == "".join(pieces)
    assert reply.n_tokens < 200


# --- context ---

def test_overflow_drops_oldest_turns_and_keeps_the_system_prompt(tiny_llama3_gguf):
    small = ChatModel(tiny_llama3_gguf, n_ctx=256)
    history = []
    for i in range(12):
        history += [Message("user", f"Question {i}: tell me about the lazy dog."),
                    Message("assistant", f"Answer {i}: the quick brown fox jumps over the lazy dog.")]
    history.append(Message("user", "最后一个问题"))
    reserve = 32
    tokens, dropped = small.fit_prompt(DEFAULT_SYSTEM_PROMPT, history, reserve)
    assert dropped > 0 and dropped % 2 == 0  # whole user/assistant turns
    assert len(tokens) + reserve <= small.n_ctx
    kept = render_reference(tiny_llama3_gguf, DEFAULT_SYSTEM_PROMPT, history[dropped:])
    assert small.llm.detokenize(tokens, special=True).decode() == kept
    assert kept.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + DEFAULT_SYSTEM_PROMPT)
    # dropping one turn fewer would not have fit
    one_more = render_reference(tiny_llama3_gguf, DEFAULT_SYSTEM_PROMPT, history[dropped - 2:])
    assert len(small.llm.tokenize(one_more.encode(), add_bos=False, special=True)) + reserve > small.n_ctx

    reply = small.reply(DEFAULT_SYSTEM_PROMPT, history, SamplingParams(seed=3, max_tokens=reserve))
    assert reply.dropped_messages == dropped
    "".join(reply)
    assert reply.context_used <= small.n_ctx


def test_context_too_small_for_the_system_prompt(tiny_llama3_gguf):
    small = ChatModel(tiny_llama3_gguf, n_ctx=256)
    with pytest.raises(InputError, match="too small for the system prompt"):
        small.reply("你好" * 400, [Message("user", "hi")])


# --- bad input ---

def test_missing_and_corrupt_model_files(tmp_path, tiny_llama3_gguf):
    with pytest.raises(InputError, match="no such GGUF file"):
        ChatModel(tmp_path / "missing.gguf")
    with pytest.raises(InputError, match="is a directory, not a GGUF file"):
        ChatModel(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a GGUF file"):
        ChatModel(tmp_path / "notes.txt")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_llama3_gguf.read_bytes()[: tiny_llama3_gguf.stat().st_size // 2])
    with pytest.raises(InputError, match="is truncated"):
        ChatModel(truncated)


def test_cli_reports_bad_input_in_one_line(tmp_path, tiny_llama3_gguf):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_llama3_gguf.read_bytes()[:4096])
    for path in (tmp_path / "missing.gguf", truncated):
        result = run_cl3("chat", path, "-p", "hi")
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_cli_prompt_streams_one_reply_to_stdout(tiny_llama3_gguf):
    result = run_cl3("chat", tiny_llama3_gguf, "-p", "你好", "--seed", "5", "-n", "16", "-c", "512")
    assert result.returncode == 0, result.stderr
    # a model not by the Chinese-LLaMA-Alpaca authors starts without a system prompt (its template's own behaviour)
    assert default_system_prompt(tiny_llama3_gguf) == ""
    expected = ChatModel(tiny_llama3_gguf, n_ctx=512).reply("", [Message("user", "你好")],
                                                           SamplingParams(seed=5, max_tokens=16))
    assert result.stdout == "".join(expected) + "\n"


# --- storage ---

def test_conversations_are_saved_listed_reopened_and_exported(tmp_path, monkeypatch):
    monkeypatch.setenv("CL3_DATA_DIR", str(tmp_path / "data"))
    store = ConversationStore()
    conversation = Conversation(messages=list(CONVERSATION), model="tiny.gguf")
    path = store.save(conversation)
    assert path.parent == tmp_path / "data" / "conversations"
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk["messages"][0] == {"role": "user", "content": "你好"}
    assert on_disk["system_prompt"] == DEFAULT_SYSTEM_PROMPT

    (path.parent / "broken.json").write_text("{not json")
    listed = store.list()
    assert [s.id for s in listed] == [conversation.id]
    assert listed[0].title == "你好" and listed[0].n_messages == 3
    assert store.load(conversation.id) == conversation
    with pytest.raises(InputError):
        store.load("broken")

    markdown = export_markdown(conversation, tmp_path / "chat.md").read_text(encoding="utf-8")
    assert "## System\n\nYou are a helpful assistant. 你是一个乐于助人的助手。" in markdown
    assert "## User\n\n你好\n\n## Assistant\n\n你好！有什么可以帮你的吗？" in markdown
