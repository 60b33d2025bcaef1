"""A summary of a GGUF file's metadata and tensors (read with gguf-py's reader)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import gguf

from .errors import InputError


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """gguf-py's reader, with a one-line error for missing, non-GGUF or truncated files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such GGUF file: {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as ex:
        raise InputError(f"{path} is not a readable GGUF file ({ex})") from None


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        return default
    value = field.contents()
    return value


def read_info(path: str | os.PathLike) -> dict:
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture", "?")
    prefix = f"{arch}."
    hparams = {k[len(prefix):]: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    tokenizer = {
        "model": field_value(reader, "tokenizer.ggml.model"),
        "pre": field_value(reader, "tokenizer.ggml.pre"),
        "tokens": len(tokens),
        "merges": len(field_value(reader, "tokenizer.ggml.merges") or []),
    }
    for kind in ("bos", "eos", "eot", "unk", "pad"):
        tid = field_value(reader, f"tokenizer.ggml.{kind}_token_id")
        if tid is not None:
            tokenizer[f"{kind}_id"] = f"{tid} {tokens[tid]!r}" if tid < len(tokens) else tid
    for kind in ("bos", "eos"):
        flag = field_value(reader, f"tokenizer.ggml.add_{kind}_token")
        if flag is not None:
            tokenizer[f"add_{kind}"] = bool(flag)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    n_bits = sum(int(t.n_bytes) * 8 for t in reader.tensors)
    file_type = field_value(reader, "general.file_type")
    return {
        "file": str(path),
        "architecture": arch,
        "name": field_value(reader, "general.name"),
        "size_label": field_value(reader, "general.size_label"),
        "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else None,
        "file_size_bytes": Path(path).stat().st_size,
        "parameters": n_params,
        "bits_per_weight": round(n_bits / n_params, 4) if n_params else None,
        "tensor_count": len(reader.tensors),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "hparams": hparams,
        "tokenizer": tokenizer,
        "chat_template": field_value(reader, "tokenizer.chat_template"),
    }
