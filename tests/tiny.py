"""Test models: small Llama-format Hugging Face checkpoints with real tokenizers and real safetensors.

Llama-3-format checkpoints are written by cl3's own writer (cl3.hf_writer, which `cl3 demo` uses) with random weights;
Llama-2 / Chinese-LLaMA-2-format ones get a SentencePiece BPE tokenizer (byte fallback; optional extra pieces appended
the way Chinese-LLaMA extended Llama's vocabulary, which needs protobuf, a test-only dependency).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from cl3.chat_templates import LLAMA2_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE  # noqa: F401 (tests import them from here)
from cl3.hf_writer import (  # noqa: F401 (tests import them from here)
    LLAMA3_SPECIAL_TOKENS,
    default_training_text,
    llama_config,
    write_llama3_checkpoint,
    write_safetensors,
)
from cl3.hf_writer import BuiltCheckpoint as TinyCheckpoint


def train_sentencepiece(texts: list[str], vocab_size: int = 2000, extra_pieces: list[str] | None = None) -> bytes:
    """A Llama-2-style SentencePiece BPE model (serialized). `extra_pieces` are appended the way Chinese-LLaMA
    extended the Llama vocabulary (new NORMAL pieces after the original ones)."""
    import sentencepiece as spm

    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    for coverage in (0.995, 0.98):  # rarer characters fall back to bytes, as in Llama-2
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
                byte_fallback=True, character_coverage=coverage, normalization_rule_name="identity",
                add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                minloglevel=2)
            break
        except RuntimeError as ex:
            if "required_chars" not in str(ex):
                raise
    data = model.getvalue()
    if extra_pieces:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(data)
        known = {p.piece for p in proto.pieces}
        low = min(p.score for p in proto.pieces)
        for piece in extra_pieces:
            if piece not in known:
                low -= 1.0
                proto.pieces.add(piece=piece, score=low, type=pb.ModelProto.SentencePiece.NORMAL)
                known.add(piece)
        data = proto.SerializeToString()
    return data


def random_llama_weights(config: dict, seed: int = 0, dtype: str = "bf16") -> dict[str, np.ndarray]:
    """Random weights with the HF Llama names and shapes, rounded to `dtype` (values returned as float32)."""
    rng = np.random.default_rng(seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = config.get("head_dim", h // n_head)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (n_head * d, h), p + "self_attn.k_proj.weight": (n_kv * d, h),
            p + "self_attn.v_proj.weight": (n_kv * d, h), p + "self_attn.o_proj.weight": (h, n_head * d),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) * (1.0 if "embed" in name else 1.0 / np.sqrt(shape[1]))
        weights[name] = _round(w.astype(np.float32), dtype)
    return weights


def _round(w: np.ndarray, dtype: str) -> np.ndarray:
    storage = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}[dtype]
    return w.astype(storage).astype(np.float32)


def build_llama3_checkpoint(out_dir: str | Path, *, seed: int = 0, dtype: str = "bf16",
                            weights: dict[str, np.ndarray] | None = None, **kwargs) -> TinyCheckpoint:
    """A Llama-3-Instruct-format checkpoint with random weights (or the given ones); see write_llama3_checkpoint."""
    made = weights if weights is not None else (lambda config: random_llama_weights(config, seed, dtype))
    return write_llama3_checkpoint(out_dir, made, dtype=dtype, **kwargs)


def build_spm_checkpoint(out_dir: str | Path, *, texts: list[str] | None = None, vocab_size: int = 2000,
                         extra_pieces: list[str] | None = None, dtype: str = "f16", shards: int = 1, seed: int = 1,
                         name: str = "Tiny-Chinese-Alpaca-2", weights: dict[str, np.ndarray] | None = None,
                         **shape) -> TinyCheckpoint:
    """A Llama-2 / Chinese-Alpaca-2-format checkpoint with a SentencePiece tokenizer.model."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(texts or default_training_text(), vocab_size, extra_pieces)
    (out / "tokenizer.model").write_bytes(model)
    n_vocab = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    shape = {"context": 4096, "rope_theta": 10000.0} | shape
    config = llama_config(n_vocab, bos=1, eos=2, dtype=dtype, **shape)
    config["_name_or_path"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": LLAMA2_CHAT_TEMPLATE, "legacy": True, "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "LlamaTokenizer"}, indent=2))
    weights = weights if weights is not None else random_llama_weights(config, seed, dtype)
    write_safetensors(weights, out, dtype, shards)
    return TinyCheckpoint(out, config, weights)
