"""Writing Llama-3-format Hugging Face checkpoints from weights: a byte-level BPE tokenizer trained on given text (Llama-3's
pre-tokenizer regex, `ignore_merges`, its special tokens and chat template), config.json and safetensors.

`cl3 demo` writes its model with it (cl3.demo_model); the tests add random weights and SentencePiece checkpoints
(tests/tiny.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .chat_templates import LLAMA3_CHAT_TEMPLATE

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
class BuiltCheckpoint:
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


def write_llama3_checkpoint(out_dir: str | Path, weights, *, texts: list[str] | None = None, vocab_base: int = 1008,
                            dtype: str = "bf16", shards: int = 2, name: str = "Tiny-Llama-3-Instruct",
                            **shape) -> BuiltCheckpoint:
    """A Llama-3-Instruct-format checkpoint: tokenizer.json, tokenizer_config.json (chat template), config.json,
    generation_config.json, safetensors. `shape` goes to `llama_config` (hidden, layers, heads, kv_heads, ffn, ...);
    `weights` are the HF-named float32 arrays, or a function of the config that makes them."""
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
    if callable(weights):  # weights made for the config (e.g. random ones, in the tests)
        weights = weights(config)
    write_safetensors(weights, out, dtype, shards)
    return BuiltCheckpoint(out, config, weights)


