"""Build small Llama-format Hugging Face checkpoints: real tokenizers, real safetensors, configurable shapes.

Used by the tests (as fixtures) and by `cl3 demo`. The tokenizers are trained here with the `tokenizers` and
`sentencepiece` libraries on cl3's own text, in the layouts of the real models:
- Llama-3: byte-level BPE with Llama-3's pre-tokenizer regex, `ignore_merges`, Llama-3 special tokens, the
  Llama-3-Instruct chat template;
- Llama-2 / Chinese-LLaMA-2: a SentencePiece BPE model with byte fallback (tokenizer.model), the Llama-2-chat template.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .chat_templates import LLAMA2_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE  # noqa: F401 (tests import them from here)

LLAMA3_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>", "<|reserved_special_token_5|>", "<|reserved_special_token_6|>",
    "<|reserved_special_token_7|>", "<|reserved_special_token_8|>", "<|reserved_special_token_9|>",
    "<|reserved_special_token_10|>",
]


@dataclass
class TinyCheckpoint:
    """A checkpoint on disk plus the exact float32 values of its weights (for independent reference computations)."""

    path: Path
    config: dict
    weights: dict[str, np.ndarray] = field(repr=False)


def default_training_text() -> list[str]:
    """cl3's own bilingual text, split into documents, for training tiny tokenizers."""
    data = Path(__file__).parent / "data"
    docs: list[str] = []
    for sub in ("calibration", "evaluation"):
        for f in sorted((data / sub).glob("*.txt")):
            docs += [d for d in f.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    docs += [_FALLBACK_TEXT] * 3
    return docs


_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. 今天天气很好，我们一起去公园散步吧。\n"
    "def add(a, b):\n    return a + b  # 加法\n"
    "中文大模型在本地电脑上运行，需要量化到4比特或8比特。Quantization reduces memory by 75%.\n"
    "1, 2, 3, 12345, 3.14159, 2024年5月30日。 Emoji: 😀🚀 —— “引号” 'quotes' \t tabs   and  spaces\n"
)


def train_llama3_tokenizer(texts: list[str], vocab_size: int = 1008):
    """A byte-level BPE tokenizer in the Llama-3 layout (returns a `tokenizers.Tokenizer`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZER_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


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


def write_safetensors(weights: dict[str, np.ndarray], out_dir: Path, dtype: str = "bf16", shards: int = 1) -> None:
    """Write weights as (optionally sharded) safetensors with a model.safetensors.index.json, like HF does."""
    from safetensors.numpy import save_file

    storage = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}[dtype]
    names = list(weights)
    if shards <= 1:
        save_file({n: np.ascontiguousarray(weights[n].astype(storage)) for n in names}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    groups = np.array_split(np.arange(len(names)), shards)
    weight_map, total = {}, 0
    for k, idx in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        part = {names[i]: np.ascontiguousarray(weights[names[i]].astype(storage)) for i in idx}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        for n, a in part.items():
            weight_map[n] = fname
            total += a.nbytes
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def llama_config(vocab_size: int, *, hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 ffn: int = 512, context: int = 8192, rope_theta: float = 500000.0, tie: bool = False,
                 bos: int | None = None, eos: int | None = None, rope_scaling: dict | None = None,
                 architecture: str = "LlamaForCausalLM", dtype: str = "bf16") -> dict:
    config = {
        "architectures": [architecture], "model_type": "mistral" if architecture.startswith("Mistral") else "llama",
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab_size, "max_position_embeddings": context,
        "rms_norm_eps": 1e-5, "rope_theta": rope_theta, "hidden_act": "silu", "tie_word_embeddings": tie,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
        "bos_token_id": bos, "eos_token_id": eos,
    }
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def build_llama3_checkpoint(out_dir: str | Path, *, texts: list[str] | None = None, vocab_base: int = 1008,
                            dtype: str = "bf16", shards: int = 2, seed: int = 0, name: str = "Tiny-Llama-3-Instruct",
                            weights: dict[str, np.ndarray] | None = None, **shape) -> TinyCheckpoint:
    """A Llama-3-Instruct-format checkpoint: tokenizer.json, tokenizer_config.json (chat template), config.json,
    generation_config.json, safetensors. `shape` goes to `llama_config` (hidden, layers, heads, kv_heads, ffn, ...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_llama3_tokenizer(texts or default_training_text(), vocab_base)
    tok.save(str(out / "tokenizer.json"))
    bos, eot, eos = (tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"))
    config = llama_config(tok.get_vocab_size(), bos=bos, eos=eot, dtype=dtype, **shape)
    config["_name_or_path"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": [eos, eot], "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for t in LLAMA3_SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, ensure_ascii=False))
    weights = weights if weights is not None else random_llama_weights(config, seed, dtype)
    write_safetensors(weights, out, dtype, shards)
    return TinyCheckpoint(out, config, weights)


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
