"""Chat templates and stops for every consumer: Chinese-LLaMA-2 / Alpaca-2 checkpoints (no template in their HF files)
get the prompt format their authors document, through convert, `cl3 chat` and the Ollama export; long tokens survive
streaming; `cl3 info --check` flags what makes chats loop or get cut off.

The Alpaca-2 reference is a port of the authors' own prompt building (ymcui/Chinese-LLaMA-Alpaca-2,
scripts/openai_server_demo/openai_api_server.py: generate_prompt / generate_chat_prompt), tokenized by the
`sentencepiece` library the way their LlamaTokenizer(legacy=True) does. The checkpoint uses the authors' real
55,296-piece tokenizer.model (scripts/tokenizer/tokenizer.model in their repository, Apache-2.0, kept in
tests/data/chinese-llama-2/; $CL3_CHINESE_LLAMA2_TOKENIZER may point at another copy), checked by its SHA-256; and
also a tiny SentencePiece model extended to 55,296 pieces the way the authors extended Llama-2's (new pieces appended
to the ModelProto with score 0, as their merge_tokenizers.py does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from cl3.chat import ChatModel, Message, SamplingParams
from cl3.chat_templates import (
    ALPACA2_CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    KNOWN_TEMPLATES,
    NAME_KEY,
    SOURCE_KEY,
    family_from_vocab,
)
from cl3.convert import convert
from cl3.errors import UnsupportedModelError
from cl3.export import export_ollama, render_chat_template
from tests.conftest import one_line_error, run_cl3
from tests.test_export import (  # noqa: F401 (fixtures)
    go_render,
    modelfile_values,
    parse_modelfile,
    real_go_render,
)

from .tiny import default_training_text, llama_config, random_llama_weights, train_sentencepiece, write_safetensors

REAL_TOKENIZER_SHA256 = "a3b8844863b200dfcca971db228e96ce388290dfcf72c15d7a9d2f604bac787c"
VOCAB_SIZE = 55296
# Pieces of the real vocabulary longer than 32 bytes (ids 39864, 48332, 49453, 50200).
LONG_PIECES = ["是下辖的一个乡镇级行政单位", "本题已加入问答社区圆桌", "目前尚未由人工引种栽培", "公众号筛选后显示了解留言功能详情"]
LONG = LONG_PIECES[-1]  # 48 bytes


def real_tokenizer() -> Path | None:
    env = os.environ.get("CL3_CHINESE_LLAMA2_TOKENIZER")
    path = Path(env) if env else Path(__file__).parent / "data" / "chinese-llama-2" / "tokenizer.model"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == REAL_TOKENIZER_SHA256:
        return path
    return None


def extended_tokenizer() -> bytes:
    """A tiny Llama-2-style SentencePiece model extended to 55,296 pieces like Chinese-LLaMA-2's: Chinese pieces
    appended with score 0 (the real vocabulary's long phrases first, then characters, then character pairs)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(train_sentencepiece(default_training_text(), 2000))
    have = {p.piece for p in proto.pieces}
    chars = [chr(c) for c in range(0x4E00, 0x9FFF + 1)]
    used = list(dict.fromkeys(c for t in default_training_text() for c in t if "\u4e00" <= c <= "\u9fff"))
    pairs = (a + b for a in used for b in used)
    for piece in [*LONG_PIECES, *chars, *("▁" + c for c in chars), *pairs]:
        if len(proto.pieces) == VOCAB_SIZE:
            break
        if piece not in have:
            proto.pieces.add(piece=piece, score=0.0, type=pb.ModelProto.SentencePiece.NORMAL)
            have.add(piece)
    return proto.SerializeToString()


def always_says(config: dict, token: int) -> dict[str, np.ndarray]:
    """Weights under which the model answers `token` at every step (attention and MLP write nothing, so the last
    hidden state is the same for every input; only `token`'s output row is non-zero)."""
    weights = random_llama_weights(config, seed=3, dtype="f16")
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            w[:] = 1.0
        elif name == "model.embed_tokens.weight":
            w[:] = 1.0
        else:
            w[:] = 0.0
    weights["lm_head.weight"][token] = 1.0
    return weights


def build_alpaca2_checkpoint(out: Path, tokenizer_model: bytes) -> Path:
    """Chinese-Alpaca-2's HF files as published: tokenizer.model, the authors' tokenizer_config.json (no chat
    template), config.json with vocab_size 55,296; tiny shapes."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    assert sp.vocab_size() == VOCAB_SIZE
    config = llama_config(VOCAB_SIZE, hidden=64, layers=1, heads=2, kv_heads=2, ffn=128, context=4096,
                          rope_theta=10000.0, bos=1, eos=2, dtype="f16")
    config["_name_or_path"] = "chinese-alpaca-2-tiny"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "unk_token": "<unk>"}))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "pad_token": None, "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "use_fast": False}, indent=2))
    write_safetensors(always_says(config, sp.piece_to_id(LONG)), out, "f16")
    return out


@pytest.fixture(scope="module", params=["real", "extended"])
def alpaca2(request, tmp_path_factory):
    """(HF dir, GGUF, sentencepiece processor, real?) for the real vocabulary and for the extended tiny one."""
    import sentencepiece as spm

    if request.param == "real":
        path = real_tokenizer()
        if path is None:
            pytest.fail("the real Chinese-LLaMA-2 tokenizer.model (ymcui/Chinese-LLaMA-Alpaca-2, scripts/tokenizer/) is "
                        "missing from tests/data/chinese-llama-2/ or $CL3_CHINESE_LLAMA2_TOKENIZER, or differs from it")
        model = path.read_bytes()
    else:
        model = extended_tokenizer()
    work = tmp_path_factory.mktemp(f"alpaca2-{request.param}")
    hf = build_alpaca2_checkpoint(work / "hf", model)
    result = convert(hf, work / "chinese-alpaca-2-tiny-f16.gguf", "f16")
    return hf, result.path, spm.SentencePieceProcessor(model_proto=model), request.param == "real"


# --- the authors' prompt format ---------------------------------------------------------------------------------------

def authors_chat_prompt(messages: list[dict]) -> str:
    """generate_chat_prompt from the authors' openai_api_server.py (the tokenizer adds the first <s>)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    prompt, first = "", True
    for m in messages:
        if m["role"] == "user":
            if first:
                sp = DEFAULT_SYSTEM_PROMPT if system is None else system
                prompt += f"[INST] <<SYS>>\n{sp}\n<</SYS>>\n\n{m['content']} [/INST]"
                first = False
            else:
                prompt += "<s>" + f"[INST] {m['content']} [/INST]"
        elif m["role"] == "assistant":
            prompt += f" {m['content']}" + "</s>"
    return prompt


def authors_tokens(sp, prompt: str) -> list[int]:
    """LlamaTokenizer(legacy=True)(prompt): BOS, then <s> / </s> as special tokens and the text between them encoded
    by sentencepiece (each piece with its dummy-prefix space)."""
    ids = [sp.bos_id()]
    for part in re.split(r"(<s>|</s>)", prompt):
        if part == "<s>":
            ids.append(sp.bos_id())
        elif part == "</s>":
            ids.append(sp.eos_id())
        elif part:
            ids += sp.encode(part)
    return ids


def conversations() -> list[list[dict]]:
    turns = [("你好，请介绍一下你自己。", "我是一个乐于助人的助手。"), ("What is 4-bit quantization?", "Fewer bits\nper weight."),
             ("再详细一点。", "好的。")]
    out = []
    for system in (None, "用中文回答。", ""):
        for n in range(1, 4):
            msgs = [{"role": "system", "content": system}] if system is not None else []
            for i in range(n):
                msgs.append({"role": "user", "content": turns[i][0]})
                if i < n - 1:
                    msgs.append({"role": "assistant", "content": turns[i][1]})
            out.append(msgs)
    return out


def test_alpaca2_template_is_the_authors_prompt_format():
    for msgs in conversations():
        assert render_chat_template(ALPACA2_CHAT_TEMPLATE, msgs, bos_token="<s>", eos_token="</s>") \
            == "<s>" + authors_chat_prompt(msgs)


# --- convert ----------------------------------------------------------------------------------------------------------

def test_checkpoint_is_recognised_and_gets_the_alpaca2_template(alpaca2):
    hf, path, sp, real = alpaca2
    reader = gguf.GGUFReader(path)
    field = lambda k: reader.fields[k].contents() if k in reader.fields else None  # noqa: E731
    assert len(field("tokenizer.ggml.tokens")) == VOCAB_SIZE
    assert field("tokenizer.chat_template") == ALPACA2_CHAT_TEMPLATE
    assert (field(SOURCE_KEY), field(NAME_KEY)) == ("family", "chinese-alpaca-2")
    proc = run_cl3("info", path)
    assert proc.returncode == 0 and "cl3's knowledge of the chinese-alpaca-2 family" in proc.stdout
    # a checkpoint with a template of its own keeps it; another vocabulary is not this family
    assert family_from_vocab("llama", [sp.id_to_piece(i) for i in range(VOCAB_SIZE)]) == "chinese-alpaca-2"
    assert family_from_vocab("llama", [sp.id_to_piece(i) for i in range(32000)]) is None


def test_convert_chat_template_override(alpaca2, tmp_path):
    hf, *_ = alpaca2
    out = tmp_path / "m.gguf"
    proc = run_cl3("convert", hf, "-o", out, "--chat-template", "chatml", "-q")
    assert proc.returncode == 0, proc.stderr
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.chat_template"].contents() == KNOWN_TEMPLATES["chatml"]
    assert reader.fields[SOURCE_KEY].contents() == "user"
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}", encoding="utf-8")
    proc = run_cl3("convert", hf, "-o", out, "--chat-template", custom, "-q", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "the user (--chat-template mine.jinja)" in run_cl3("info", out).stdout
    one_line_error(run_cl3("convert", hf, "-o", tmp_path / "x.gguf", "--chat-template", "no-such-template"),
                   "neither a file nor a known template")
    assert not (tmp_path / "x.gguf").exists()


# --- chat ---------------------------------------------------------------------------------------------------------------

def test_chat_prompt_tokens_are_the_authors(alpaca2):
    _, path, sp, real = alpaca2
    model = ChatModel(path, n_ctx=1024)
    assert model.template_source == "gguf"
    for msgs in conversations():
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        history = [Message(m["role"], m["content"]) for m in msgs if m["role"] != "system"]
        tokens = model.tokenize_prompt(model.format_prompt(system, history))
        if msgs[0]["role"] == "system" and system == "":
            continue  # cl3 chat sends no system message for an empty system prompt: the template's default applies
        assert tokens == authors_tokens(sp, authors_chat_prompt(msgs)), msgs


def test_cli_chat_answers_through_the_alpaca2_template_with_long_tokens(alpaca2):
    _, path, sp, real = alpaca2
    from cl3.chat import default_system_prompt

    assert default_system_prompt(path) == DEFAULT_SYSTEM_PROMPT  # the authors' model: their prompt, as in their scripts
    proc = run_cl3("chat", path, "-p", "你好", "--temp", "0", "-n", "3", "-c", "512")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == LONG * 3 + "\n"


def test_streamed_reply_keeps_tokens_longer_than_32_bytes(alpaca2):
    _, path, sp, real = alpaca2
    model = ChatModel(path, n_ctx=512)
    long_id = sp.piece_to_id(LONG)
    assert len(LONG.encode()) > 32
    assert model.llm.detokenize([long_id]) == b""  # llama-cpp-python 0.3.36's 32-byte buffer drops it
    reply = model.reply(DEFAULT_SYSTEM_PROMPT, [Message("user", "写一段话。")], SamplingParams(temperature=0, max_tokens=4))
    pieces = list(reply)
    assert pieces == [LONG] * 4 and reply.text == LONG * 4


def test_gguf_without_template_and_chat_template_option(alpaca2, tmp_path):
    _, path, sp, real = alpaca2
    from tests.test_chat import without_metadata

    bare = without_metadata(path, tmp_path / "bare.gguf", "tokenizer.chat_template", SOURCE_KEY, NAME_KEY)
    model = ChatModel(bare, n_ctx=512)  # converted elsewhere: cl3 still knows the family
    assert model.template_source == "cl3: chinese-alpaca-2"
    assert model.format_prompt("", [Message("user", "你好")]) == "<s>" + authors_chat_prompt(
        [{"role": "user", "content": "你好"}])
    other = ChatModel(bare, n_ctx=512, chat_template="llama-2-chat")
    assert other.template_source == "--chat-template llama-2-chat"
    assert other.format_prompt("", [Message("user", "你好")]) == "<s>[INST] 你好 [/INST]"
    proc = run_cl3("chat", bare, "-p", "你好", "--temp", "0", "-n", "1", "--chat-template", "llama-2-chat")
    assert proc.returncode == 0 and proc.stdout == LONG + "\n", proc.stderr
    one_line_error(run_cl3("chat", bare, "-p", "hi", "--chat-template", tmp_path / "missing.jinja"),
                   "neither a file nor a known template")


# --- Ollama -------------------------------------------------------------------------------------------------------------

def test_modelfile_renders_the_alpaca2_format(alpaca2, tmp_path, go_render):  # noqa: F811
    _, path, sp, real = alpaca2
    export = export_ollama(path, tmp_path)
    assert export.system is None  # the template inserts the authors' prompt itself
    assert export.stops == ["</s>", "[INST]"]
    [template] = modelfile_values(export.modelfile, "TEMPLATE")
    convs = [c for c in conversations() if not (c[0]["role"] == "system" and c[0]["content"] == "")]
    for conv, prompt in zip(convs, go_render(template, convs)):
        assert prompt == authors_chat_prompt(conv)  # Ollama adds the BOS itself (add_bos)


# --- cl3 info --check ---------------------------------------------------------------------------------------------------

def with_metadata(src: Path, dst: Path, new: dict[str, tuple[gguf.GGUFValueType, object]], remove=()) -> Path:
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    copy_with_new_metadata(reader, gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess),
                           {k: MetadataDetails(t, v) for k, (t, v) in new.items()}, list(remove))
    return dst


def check_lines(proc) -> dict[str, list[str]]:
    lines = proc.stdout.splitlines()
    return {level: [x for x in lines if x.startswith(level + ":")] for level in ("ok", "note", "warning", "error")}


def test_check_passes_a_good_gguf(tiny_llama3_gguf, alpaca2):
    proc = run_cl3("info", tiny_llama3_gguf, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = check_lines(proc)
    assert not found["error"] and not found["warning"]
    assert "ok: <|eot_id|> (" in proc.stdout and "ok: pre-tokenizer llama-bpe" in proc.stdout
    assert "ok: stops an Ollama export writes: <|eot_id|>, <|start_header_id|>" in proc.stdout
    assert any("writes <|begin_of_text|> and the model adds BOS" in x for x in found["note"])
    _, path, _, _ = alpaca2
    proc = run_cl3("info", path, "--check")
    assert proc.returncode == 0, proc.stdout
    assert "ok: chat template from cl3's knowledge of the chinese-alpaca-2 family" in proc.stdout
    assert "ok: </s> (2) closes an assistant turn and ends generation" in proc.stdout


def test_check_flags_an_end_of_turn_token_that_does_not_end_generation(tiny_llama3_gguf, tiny_llama3_dir, tmp_path):
    vocab = json.loads((tiny_llama3_dir / "tokenizer.json").read_text())["added_tokens"]
    end_of_text = next(t["id"] for t in vocab if t["content"] == "<|end_of_text|>")
    bad = with_metadata(tiny_llama3_gguf, tmp_path / "eot.gguf",
                        {"tokenizer.ggml.eos_token_id": (gguf.GGUFValueType.UINT32, end_of_text)},
                        remove=["tokenizer.ggml.eot_token_id"])
    proc = run_cl3("info", bad, "--check")
    assert proc.returncode == 1
    [error] = check_lines(proc)["error"]
    assert error.startswith("error: <|eot_id|> (") and "not an end-of-generation token" in error
    assert "fix: cl3 convert" in error


def test_check_flags_a_double_bos(tiny_spm_gguf, tmp_path):
    double = "{{ bos_token }}" + KNOWN_TEMPLATES["llama-2-chat"]  # the Llama-2 template writes <s> before [INST] too
    bad = with_metadata(tiny_spm_gguf, tmp_path / "bos.gguf",
                        {"tokenizer.chat_template": (gguf.GGUFValueType.STRING, double)})
    proc = run_cl3("info", bad, "--check")
    assert proc.returncode == 1
    [error] = check_lines(proc)["error"]
    assert "starts with two BOS tokens" in error and "fix: cl3 convert SRC --chat-template" in error
    # and the same file passes with the template fixed from the command line
    assert run_cl3("info", bad, "--check", "--chat-template", "llama-2-chat").returncode == 0


def test_check_findings_follow_an_export(tiny_llama3_gguf, tiny_llama3_dir, tmp_path):
    proc = run_cl3("export", "ollama", tiny_llama3_gguf, "-o", tmp_path)
    assert proc.returncode == 0 and "check:" not in proc.stderr, proc.stderr
    vocab = json.loads((tiny_llama3_dir / "tokenizer.json").read_text())["added_tokens"]
    end_of_text = next(t["id"] for t in vocab if t["content"] == "<|end_of_text|>")
    bad = with_metadata(tiny_llama3_gguf, tmp_path / "eot.gguf",
                        {"tokenizer.ggml.eos_token_id": (gguf.GGUFValueType.UINT32, end_of_text)},
                        remove=["tokenizer.ggml.eot_token_id"])
    proc = run_cl3("export", "ollama", bad, "-o", tmp_path)
    assert proc.returncode == 0  # the Modelfile is written (its stops include <|eot_id|>); the finding is shown
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("check:")]
    assert line.startswith("check: error: <|eot_id|>")
    assert "<|eot_id|>" in [v for c, v in parse_modelfile(next(tmp_path.glob("*.Modelfile")).read_text()) if c == "PARAMETER stop"]


def test_template_errors_are_one_line(tmp_path, tiny_spm_gguf):
    bad = with_metadata(tiny_spm_gguf, tmp_path / "raise.gguf",
                        {"tokenizer.chat_template": (gguf.GGUFValueType.STRING, "{{ raise_exception('no') }}")})
    proc = run_cl3("info", bad, "--check")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [error] = check_lines(proc)["error"]
    assert "fails on a one-message conversation" in error
    with pytest.raises(UnsupportedModelError):
        ChatModel(bad, n_ctx=256).format_prompt("", [Message("user", "hi")])
