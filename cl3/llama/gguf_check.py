"""What llama.cpp's loader assumes of a GGUF's metadata, checked before any code that asserts it sees the file.

ggml's GGUF parser (``gguf_init_from_file``) refuses a structurally broken file cleanly, but its getters and
llama.cpp's loader GGML_ASSERT what they assume (a token list of strings, ``gguf_get_arr_str`` in range, a block
count within ``LLAMA_MAX_LAYERS``, a known rope scaling type, expert counts in range, non-zero head counts), and
cl3's own readers index token arrays by each other's lengths. A damaged or hostile file would kill the process
there with no message; here it gets one InputError naming the key. Only type getters are called before the types
are known to be right, so nothing here can assert; the work is per key, never per token (a 128k vocabulary costs
one numpy copy of its token types).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from .gguf_file import (
    GGUF_ARRAY,
    GGUF_BOOL,
    GGUF_FLOAT32,
    GGUF_FLOAT64,
    GGUF_INT8,
    GGUF_INT16,
    GGUF_INT32,
    GGUF_INT64,
    GGUF_STRING,
    GGUF_UINT8,
    GGUF_UINT16,
    GGUF_UINT32,
    GGUF_UINT64,
)

if TYPE_CHECKING:
    from .gguf_file import GgufFile

LLAMA_MAX_LAYERS = 512    # llama-hparams.h
LLAMA_MAX_EXPERTS = 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama-model.cpp LLAMA_ROPE_SCALING_TYPES

INTEGER = (GGUF_UINT8, GGUF_INT8, GGUF_UINT16, GGUF_INT16, GGUF_UINT32, GGUF_INT32, GGUF_UINT64, GGUF_INT64)
NUMBER = (*INTEGER, GGUF_FLOAT32, GGUF_FLOAT64)
TYPE_NAMES = {GGUF_UINT8: "uint8", GGUF_INT8: "int8", GGUF_UINT16: "uint16", GGUF_INT16: "int16",
              GGUF_UINT32: "uint32", GGUF_INT32: "int32", GGUF_FLOAT32: "float32", GGUF_BOOL: "bool",
              GGUF_STRING: "string", GGUF_ARRAY: "array", GGUF_UINT64: "uint64", GGUF_INT64: "int64",
              GGUF_FLOAT64: "float64"}

# keys cl3 or llama.cpp read as scalars of a kind: (types allowed, words for the message)
STRING_KEYS = ("general.architecture", "general.type", "general.name", "general.basename", "general.finetune",
               "general.version", "general.size_label", "general.organization", "general.license",
               "general.license.name", "general.license.link", "tokenizer.ggml.model", "tokenizer.ggml.pre",
               "tokenizer.chat_template")
INTEGER_KEYS = ("general.file_type", "general.quantization_version", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.seperator_token_id", "tokenizer.ggml.mask_token_id")
BOOL_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token")
_LAYER = re.compile(r"blk\.(\d+)\.")


def _fail(f: GgufFile, key: str, problem: str) -> InputError:
    return InputError(f"{f.path} has damaged metadata: {key} {problem}")


def _type_name(f: GgufFile, key: str) -> str:
    kind = f.kv_type(key)
    if kind == GGUF_ARRAY:
        return f"an array of {TYPE_NAMES.get(f.array_type(key), 'unknown type')}"
    return TYPE_NAMES.get(kind, f"type {kind}")


def _scalar(f: GgufFile, key: str, allowed: tuple[int, ...], words: str):
    """The value of ``key`` when present and of an allowed type; None when absent."""
    kind = f.kv_type(key)
    if kind is None:
        return None
    if kind not in allowed:
        raise _fail(f, key, f"must be {words}, not {_type_name(f, key)}")
    return f.get(key)


def _count(f: GgufFile, key: str, *, minimum: int = 1, maximum: int | None = None, n_layer: int | None = None):
    """An integer hyper-parameter (or, with ``n_layer``, a per-layer array of them) within its range; None when
    absent. Returns the largest value."""
    kind = f.kv_type(key)
    if kind is None:
        return None
    if kind == GGUF_ARRAY and n_layer is not None:
        if f.array_type(key) not in INTEGER:
            raise _fail(f, key, f"must be integers, not {_type_name(f, key)}")
        values = f.array(key)
        if len(values) != n_layer:
            raise _fail(f, key, f"has {len(values)} entries for {n_layer} layers")
        lowest, value = (int(values.min()), int(values.max())) if len(values) else (0, 0)
        if lowest < 0:
            raise _fail(f, key, f"holds {lowest}")
    else:
        value = _scalar(f, key, INTEGER, "an integer")
        if value < minimum:
            raise _fail(f, key, f"is {value}; it must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise _fail(f, key, f"is {value}; llama.cpp allows at most {maximum}")
    return value


def check_header(f: GgufFile) -> None:
    """Raise one InputError naming the key when ``f``'s metadata breaks what llama.cpp or cl3 assume."""
    for key in STRING_KEYS:
        _scalar(f, key, (GGUF_STRING,), "a string")
    for key in INTEGER_KEYS:
        _scalar(f, key, INTEGER, "an integer")
    for key in BOOL_KEYS:
        _scalar(f, key, (GGUF_BOOL,), "true or false")
    n_tokens = _check_tokenizer(f)
    arch = f.get("general.architecture")
    if arch and (f.get("general.type") or "model") == "model":
        _check_hparams(f, arch, n_tokens)


def _check_tokenizer(f: GgufFile) -> int | None:
    tokens = "tokenizer.ggml.tokens"
    if f.kv_type(tokens) is None:
        return None
    if f.array_type(tokens) != GGUF_STRING:
        raise _fail(f, tokens, f"must be an array of strings, not {_type_name(f, tokens)}")
    n_tokens = f.array_len(tokens)
    if not 0 < n_tokens < 2**31:
        raise _fail(f, tokens, f"holds {n_tokens} tokens")
    for key, allowed, words in (("tokenizer.ggml.scores", (GGUF_FLOAT32, GGUF_INT32), "float32"),
                                ("tokenizer.ggml.token_type", (GGUF_INT32,), "int32")):
        if f.kv_type(key) is None:
            continue
        if f.array_type(key) not in allowed:
            raise _fail(f, key, f"must be an array of {words}, not {_type_name(f, key)}")
        if (n := f.array_len(key)) != n_tokens:
            raise _fail(f, key, f"has {n} entries for {n_tokens} tokens")
    merges = "tokenizer.ggml.merges"
    if f.kv_type(merges) is not None and f.array_type(merges) != GGUF_STRING:
        raise _fail(f, merges, f"must be an array of strings, not {_type_name(f, merges)}")
    # a special id outside the vocabulary is tolerated: llama.cpp warns and uses its default, cl3 skips it (such
    # ids occur in working files, e.g. a padding id equal to the vocabulary size)
    return n_tokens


def _check_hparams(f: GgufFile, arch: str, n_tokens: int | None) -> None:
    p = f"{arch}."
    n_layer = _count(f, p + "block_count", maximum=LLAMA_MAX_LAYERS)
    layers = {int(m.group(1)) for t in f.tensors if (m := _LAYER.match(t.name))}
    if n_layer is not None and layers and max(layers) >= n_layer:
        raise _fail(f, p + "block_count", f"is {n_layer}, but the file has tensors of layer {max(layers)}")
    if n_layer is not None and layers and len(layers) < n_layer:
        raise _fail(f, p + "block_count", f"is {n_layer}, but the file has tensors for {len(layers)} layers")
    n_layer = n_layer or 1
    _count(f, p + "context_length")
    n_embd = _count(f, p + "embedding_length")
    _count(f, p + "feed_forward_length", minimum=0, n_layer=n_layer)
    n_head = _count(f, p + "attention.head_count", minimum=0, n_layer=n_layer)
    n_head_kv = _count(f, p + "attention.head_count_kv", minimum=0, n_layer=n_layer)
    if n_head is not None and f.kv_type(p + "attention.head_count") != GGUF_ARRAY:
        head_key = p + "attention.head_count"
        if n_head == 0 and arch == "llama":
            raise _fail(f, head_key, "is 0")
        kv_key = p + "attention.head_count_kv"
        if n_head_kv is not None and f.kv_type(kv_key) != GGUF_ARRAY and n_head and (n_head_kv == 0 or n_head % n_head_kv):
            raise _fail(f, kv_key, f"is {n_head_kv}; it must divide {head_key} ({n_head})")
        if n_embd and n_head and f.kv_type(p + "attention.key_length") is None and n_embd % n_head:
            raise _fail(f, head_key, f"is {n_head}; it must divide {p}embedding_length ({n_embd})")
        head_dim = _count(f, p + "attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
        rope = _count(f, p + "rope.dimension_count", minimum=0)
        if rope is not None and head_dim and (rope > head_dim or rope % 2):
            raise _fail(f, p + "rope.dimension_count", f"is {rope} for heads of {head_dim}")
    for key in ("rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon"):
        value = _scalar(f, p + key, NUMBER, "a number")
        if value is not None and not np.isfinite(value):
            raise _fail(f, p + key, f"is {value}")
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):  # ggml's norms assert eps >= 0
        value = _scalar(f, p + key, NUMBER, "a number")
        if value is not None and value < 0:
            raise _fail(f, p + key, f"is {value}; it must not be negative")
    scaling = _scalar(f, p + "rope.scaling.type", (GGUF_STRING,), "a string")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise _fail(f, p + "rope.scaling.type", f"is {scaling!r}, not one of {', '.join(ROPE_SCALING_TYPES)}")
    n_expert = _count(f, p + "expert_count", minimum=0, maximum=LLAMA_MAX_EXPERTS) or 0
    n_used = _count(f, p + "expert_used_count", minimum=0, n_layer=n_layer) or 0
    if n_used > n_expert or (n_expert > 0) != (n_used > 0):
        raise _fail(f, p + "expert_used_count", f"is {n_used} for {n_expert} experts")
    nextn = _count(f, p + "nextn_predict_layers", minimum=0)
    if nextn is not None and nextn > n_layer:
        raise _fail(f, p + "nextn_predict_layers", f"is {nextn}, more than the {n_layer} layers")
    embd = next((t for t in f.tensors if t.name == "token_embd.weight"), None)
    if embd is not None and n_embd is not None and embd.ne[0] != n_embd:
        raise _fail(f, p + "embedding_length", f"is {n_embd}, but token_embd.weight has rows of {embd.ne[0]}")
    if embd is not None and n_embd is not None and n_tokens is not None and embd.ne[1] != n_tokens:
        raise _fail(f, "tokenizer.ggml.tokens", f"holds {n_tokens} tokens, but token_embd.weight has {embd.ne[1]}")
