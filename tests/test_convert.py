"""cl3 convert: the GGUF loads in llama.cpp, tokenizes like the HF tokenizer and computes the HF model's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_cpp import Llama

from cl3.convert import convert
from cl3.errors import Cl3Error

from .conftest import run_cl3
from .reference import llama_logits
from .tiny import build_llama3_checkpoint, llama_config, random_llama_weights, write_safetensors

BILINGUAL = [
    "Hello, world! 你好，世界！",
    "中文大模型在个人电脑上运行，需要把权重量化到4比特。",
    "Llama-3-Chinese-8B-Instruct 的上下文长度是 8K（8192 tokens）。",
    "def quantize(x: float) -> int:\n    return round(x * 127)  # 量化到 int8\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "Emoji 😀🚀🇨🇳 and CJK 𠀀𪚥 rare characters, 繁體中文與简体中文。",
    "   leading spaces, trailing spaces   \n\n\ttabs\tand\r\nCRLF\n",
    "Numbers: 1234567890, 3.14159, -42, 1e-5, 2024年5月30日，百分之九十九（99%）。",
    "It's what we'll do; they've said it's 'quoted' and \"double-quoted\".",
    "混合 mixed 文本 text：《三体》是刘慈欣的科幻小说，English title \"The Three-Body Problem\".",
    "",
    " ",
    "\n",
]


def load(path: Path, **kw) -> Llama:
    return Llama(str(path), n_ctx=256, n_batch=256, verbose=False, logits_all=True, seed=0, **kw)


def gguf_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")} | {
        "tensors": {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}}


# --- tokenizer parity -------------------------------------------------------------------------------------------

def test_llama3_tokenization_matches_hf_tokenizers(tiny_llama3_dir, tiny_llama3_gguf):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_llama3_dir / "tokenizer.json"))
    llm = load(tiny_llama3_gguf, vocab_only=True)
    for text in BILINGUAL:
        expected = hf.encode(text, add_special_tokens=True).ids
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected, text
    chat = "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf.encode(chat, add_special_tokens=False).ids


def test_spm_tokenization_matches_sentencepiece(tiny_spm_dir, tiny_spm_gguf):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_spm_dir / "tokenizer.model"))
    llm = load(tiny_spm_gguf, vocab_only=True)
    for text in BILINGUAL:
        if not text.strip():
            continue  # sentencepiece and llama.cpp agree on text, not on the dummy prefix of blank input
        expected = [sp.bos_id()] + sp.encode(text)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected, text
    # the Chinese-LLaMA-style extension pieces are used by both
    assert sp.piece_to_id("大模型") in sp.encode("大模型")


def test_gguf_metadata(tiny_llama3, tiny_llama3_gguf):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_llama3.path / "tokenizer.json"))
    reader = gguf.GGUFReader(tiny_llama3_gguf)
    field = lambda k: reader.get_field(k).contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "llama-bpe"
    assert field("tokenizer.ggml.eot_token_id") == hf.token_to_id("<|eot_id|>")
    assert field("tokenizer.ggml.bos_token_id") == hf.token_to_id("<|begin_of_text|>")
    assert field("tokenizer.ggml.add_bos_token") is True
    config = tiny_llama3.config
    template = json.loads((tiny_llama3.path / "tokenizer_config.json").read_text())["chat_template"]
    assert field("tokenizer.chat_template") == template
    assert field("llama.context_length") == config["max_position_embeddings"]
    assert field("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field("llama.rope.freq_base") == pytest.approx(config["rope_theta"])
    assert field("general.file_type") == gguf.LlamaFileType.ALL_F32
    types = gguf.GGUFReader(tiny_llama3_gguf).tensors
    assert len(types) == 2 + 1 + 9 * config["num_hidden_layers"]


# What llama.cpp's convert_hf_to_gguf.py (the source llama-cpp-python 0.3.36 vendors) writes for this checkpoint,
# transcribed from it: ModelBase.prepare_metadata (general.type "model" by set_type, gguf.Metadata's general.* keys:
# name, basename and finetune from "Tiny-Llama-3-Instruct", the size label, sampling from generation_config.json;
# general.quantization_version for every outtype), TextModel.set_gguf_parameters (key_length/value_length whenever
# transformers' config has head_dim, which LlamaConfig always fills in; file_type) and LlamaModel's (vocab_size,
# rope.dimension_count); GGUFWriter adds general.architecture.
CONVERTER_KEYS = {
    "general.architecture", "general.type", "general.name", "general.basename", "general.finetune",
    "general.size_label", "general.sampling.temp", "general.sampling.top_p", "general.file_type",
    "general.quantization_version",
    "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "llama.attention.key_length", "llama.attention.value_length",
    "llama.vocab_size", "llama.rope.dimension_count",
}


def test_general_and_llama_keys_are_the_converters(tiny_llama3, tiny_llama3_gguf_f16):
    reader = gguf.GGUFReader(tiny_llama3_gguf_f16)
    keys = {k for k in reader.fields if k.startswith(("general.", "llama."))}
    assert keys == CONVERTER_KEYS, (sorted(keys - CONVERTER_KEYS), sorted(CONVERTER_KEYS - keys))
    field = lambda k: reader.get_field(k).contents()  # noqa: E731
    config = tiny_llama3.config
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert field("general.type") == "model"
    assert field("general.quantization_version") == 2  # GGML_QNT_VERSION in ggml.h
    assert field("llama.attention.key_length") == field("llama.attention.value_length") == head_dim
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_F16


def test_eot_ends_generation(tiny_llama3_gguf):
    """<|eot_id|> must be an end-of-generation token in llama.cpp, or instruct models chat forever."""
    import llama_cpp

    llm = load(tiny_llama3_gguf, vocab_only=True)
    eot = llm.tokenize(b"<|eot_id|>", add_bos=False, special=True)
    assert len(eot) == 1
    assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), eot[0])


# --- numerical parity -------------------------------------------------------------------------------------------

def _llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = Llama(str(path), n_ctx=64, n_batch=64, verbose=False, logits_all=True, seed=0, type_k=0, type_v=0,
                flash_attn=False)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def _assert_close(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err < rel, f"max relative error {err:.2e}"


def test_f32_logits_match_numpy_reference(tiny_llama3, tiny_llama3_gguf):
    tokens = [tiny_llama3.config["bos_token_id"]] + list(range(5, 40, 3))
    expected = llama_logits(tiny_llama3.weights, tiny_llama3.config, tokens)
    _assert_close(_llama_cpp_logits(tiny_llama3_gguf, tokens), expected, 1e-3)


def test_spm_f32_logits_match_numpy_reference(tiny_spm, tiny_spm_gguf):
    tokens = [1] + list(range(100, 130, 2))
    expected = llama_logits(tiny_spm.weights, tiny_spm.config, tokens)
    _assert_close(_llama_cpp_logits(tiny_spm_gguf, tokens), expected, 1e-3)


@pytest.mark.parametrize("src_dtype", ["f32", "f16"])
def test_tied_embeddings_source_dtypes_and_mistral(tmp_path, src_dtype):
    ckpt = build_llama3_checkpoint(tmp_path / "hf", dtype=src_dtype, shards=1, tie=True, kv_heads=1,
                                   architecture="MistralForCausalLM", texts=["tiny text 小文本"] * 20, vocab_base=300)
    assert "lm_head.weight" not in ckpt.weights
    out = convert(ckpt.path, tmp_path / "m.gguf", "f32").path
    tokens = [ckpt.config["bos_token_id"], 5, 9, 17, 33]
    _assert_close(_llama_cpp_logits(out, tokens), llama_logits(ckpt.weights, ckpt.config, tokens), 1e-3)


def test_outtypes_are_exact_encodings(tiny_llama3, tmp_path):
    """f16/bf16/q8_0 outputs hold the source values encoded exactly as numpy / gguf-py's quantizer encode them."""
    ref = tiny_llama3.weights["model.layers.1.mlp.down_proj.weight"]
    for outtype, qtype in [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")]:
        path = convert(tiny_llama3.path, tmp_path / f"{outtype}.gguf", outtype).path
        tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_down.weight")
        assert tensor.tensor_type.name == qtype
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ref.shape)
        if outtype == "q8_0":
            assert np.abs(values - ref).max() <= np.abs(ref).max() / 127
        else:  # IEEE round-to-nearest-even of the bf16 source values (f16 subnormals round)
            expected = ref.astype(np.float16).astype(np.float32) if outtype == "f16" else ref
            assert np.array_equal(values, expected)
        norm = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_norm.weight")
        assert norm.tensor_type.name == "F32"


@pytest.mark.parametrize("scaling,expected", [
    ({"type": "linear", "factor": 4.0}, {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
    ({"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096},
     {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 16.0,
      "llama.rope.scaling.original_context_length": 4096}),
    ({"type": "dynamic", "factor": 2.0}, {"llama.rope.freq_base": 10000.0 * 2.0 ** (64 / 62)}),
])
def test_rope_scaling_metadata(tmp_path, scaling, expected):
    ckpt = build_llama3_checkpoint(tmp_path / "hf", texts=["rope 旋转位置编码"] * 20, vocab_base=300, shards=1,
                                   rope_theta=10000.0, rope_scaling=scaling)
    fields = gguf_fields(convert(ckpt.path, tmp_path / "r.gguf", "f16").path)
    for key, value in expected.items():
        assert fields[key] == pytest.approx(value, rel=1e-6)


def test_llama3_rope_factors(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    ckpt = build_llama3_checkpoint(tmp_path / "hf", texts=["llama 3.1"] * 20, vocab_base=300, shards=1,
                                   rope_scaling=scaling, context=131072)
    path = convert(ckpt.path, tmp_path / "r.gguf", "f16").path
    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight").data
    # Meta's reference: high frequencies unscaled, low frequencies divided by the factor, a smooth ramp between
    inv = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
    wavelen = 2 * np.pi / inv
    assert np.all(freqs[wavelen < 8192 / 4] == 1.0) and np.all(freqs[wavelen > 8192] == 8.0)
    assert np.all(np.diff(freqs) >= 0)
    Llama(str(path), n_ctx=64, verbose=False)  # llama.cpp accepts the tensor


def test_default_output_name(tiny_llama3, tmp_path):
    result = convert(tiny_llama3.path, tmp_path, "q8_0")
    assert result.path.parent == tmp_path
    assert result.path.name.endswith("-Q8_0.gguf")
    assert "1.7M" in result.path.name


# --- bad input: one line, non-zero exit, nothing left behind ------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _broken_inputs(tiny: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    cases = {}
    d = _copy(tiny, tmp / "no-config"); (d / "config.json").unlink()
    cases["missing config"] = (d, "config.json not found")
    d = _copy(tiny, tmp / "bad-config"); (d / "config.json").write_text("{not json")
    cases["invalid config"] = (d, "not valid JSON")
    d = _copy(tiny, tmp / "arch"); c = json.loads((d / "config.json").read_text())
    c["architectures"] = ["GPT2LMHeadModel"]; (d / "config.json").write_text(json.dumps(c))
    cases["unsupported architecture"] = (d, "not supported")
    d = _copy(tiny, tmp / "trunc"); shard = sorted(d.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    cases["truncated safetensors"] = (d, "truncated")
    d = _copy(tiny, tmp / "corrupt"); shard = sorted(d.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}" + b"\0" * 100)
    cases["corrupt safetensors"] = (d, "not a valid safetensors")
    d = _copy(tiny, tmp / "shape"); c = json.loads((d / "config.json").read_text())
    c["intermediate_size"] = 768; (d / "config.json").write_text(json.dumps(c))
    cases["shape mismatch"] = (d, "shape mismatch")
    d = _copy(tiny, tmp / "notok"); (d / "tokenizer.json").unlink()
    cases["missing tokenizer"] = (d, "no tokenizer")
    d = tmp / "pickle"; d.mkdir(); shutil.copy(tiny / "config.json", d); (d / "pytorch_model.bin").write_bytes(b"x")
    cases["pickle"] = (d, "--allow-pickle")
    cases["missing dir"] = (tmp / "nowhere", "no such model directory")
    return cases


def test_bad_inputs_give_one_line_and_leave_nothing(tiny_llama3_dir, tmp_path):
    for label, (src, message) in _broken_inputs(tiny_llama3_dir, tmp_path / "in").items():
        out_dir = tmp_path / f"out-{label.replace(' ', '-')}"
        out_dir.mkdir()
        result = run_cl3("convert", src, "-o", out_dir / "x.gguf", "-q")
        assert result.returncode != 0, label
        assert message in result.stderr, (label, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert list(out_dir.iterdir()) == [], label


def test_unwritable_output(tiny_llama3_dir, tmp_path):
    result = run_cl3("convert", tiny_llama3_dir, "-o", tmp_path / "missing-dir" / "x.gguf", "-q")
    assert result.returncode != 0 and "output directory does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_library_errors_are_cl3_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_config(300)))
    write_safetensors(random_llama_weights(llama_config(300, hidden=64, ffn=128)), tmp_path, shards=1)
    with pytest.raises(Cl3Error, match="shape mismatch"):
        convert(tmp_path, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_cli_convert_and_info(tiny_llama3_dir, tmp_path):
    result = run_cl3("convert", tiny_llama3_dir, "-o", tmp_path / "m.gguf", "--outtype", "f16")
    assert result.returncode == 0, result.stderr
    info = run_cl3("info", tmp_path / "m.gguf", "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["architecture"] == "llama" and data["tokenizer"]["pre"] == "llama-bpe"
    assert data["tensor_types"] == {"F32": 5, "F16": 16}
    assert run_cl3("info", tmp_path / "m.gguf").returncode == 0
    bad = run_cl3("info", tiny_llama3_dir / "config.json")
    assert bad.returncode != 0 and "not a GGUF file" in bad.stderr and "Traceback" not in bad.stderr


def test_converted_q8_0_is_named_like_a_quantized_q8_0_because_it_is_the_same_file(tiny_llama3, tmp_path):
    """`convert --outtype q8_0` writes {name}-{size}-Q8_0.gguf, as llama.cpp's converter names it and as `quantize …
    Q8_0` names its output: the two are the same weights (every tensor byte-identical), so the name is kept and a
    second one is refused as existing rather than written under another name."""
    from cl3.quantize import quantize

    converted = convert(tiny_llama3.path, f"{tmp_path / 'c'}/", "q8_0").path
    f16 = convert(tiny_llama3.path, f"{tmp_path / 'f16'}/", "f16").path
    assert converted.name == f16.name.replace("-F16.gguf", "-Q8_0.gguf")
    [quantized] = quantize(f16, "Q8_0", out=f"{tmp_path / 'q'}/").outputs
    assert quantized.name == converted.name
    ours, theirs = gguf.GGUFReader(converted), gguf.GGUFReader(quantized)
    assert {t.name: (t.tensor_type, t.data.tobytes()) for t in ours.tensors} == \
        {t.name: (t.tensor_type, t.data.tobytes()) for t in theirs.tensors}
