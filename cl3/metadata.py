"""Where GGUF metadata is read: one reader for `cl3 info`, export, serve, quantize, imatrix and bench.

It reads through ggml's own C parser (:class:`cl3.llama.GgufFile`), so a 128k-token vocabulary costs milliseconds:
token texts are fetched one by one where needed (special and control tokens), never as a whole list.
Key names come from gguf-py's constants (``gguf.Keys``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .llama import GgufFile, TensorInfo

K = gguf.Keys
SPECIAL_TOKEN_KEYS = {"bos": K.Tokenizer.BOS_ID, "eos": K.Tokenizer.EOS_ID, "eot": K.Tokenizer.EOT_ID,
                      "eom": K.Tokenizer.EOM_ID, "unk": K.Tokenizer.UNK_ID, "pad": K.Tokenizer.PAD_ID,
                      "sep": K.Tokenizer.SEP_ID}
SAMPLING_PREFIX = "general.sampling."


@dataclass
class GgufMetadata:
    """What cl3 needs from a GGUF's header (no tensor data is read)."""

    path: Path
    file_size: int
    general_type: str                  # "model", "imatrix", "adapter"
    architecture: str | None
    name: str | None
    basename: str | None
    finetune: str | None
    version: str | None
    size_label: str | None
    organization: str | None
    file_type: int | None              # general.file_type (enum llama_ftype)
    context_length: int | None
    chat_template: str | None
    hparams: dict[str, object]         # the "<architecture>.*" keys, without the prefix
    tokenizer_model: str | None        # tokenizer.ggml.model: "gpt2" (BPE), "llama" (SentencePiece), ...
    pre_tokenizer: str | None
    n_tokens: int
    n_merges: int
    special_ids: dict[str, int]        # bos, eos, eot, eom, unk, pad, sep: those the file sets
    special_texts: dict[str, str]      # their token texts
    add_bos: bool | None
    add_eos: bool | None
    control_tokens: frozenset[str]     # texts of every CONTROL token
    sampling: dict[str, object]        # general.sampling.* by their GGUF names (temp, top_k, ...)
    license: str | None
    license_name: str | None
    license_link: str | None
    tensors: list[TensorInfo] = field(repr=False)
    values: dict[str, object] = field(repr=False)  # every key that is not an array

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float | None:
        """Tensor bits over parameters, as llama.cpp counts BPW (llama_model_size * 8 / llama_model_n_params)."""
        return bits_per_weight(self.tensor_bytes, self.n_params)

    @property
    def file_type_name(self) -> str | None:
        """general.file_type as people know it: 15 -> Q4_K_M, 1 -> F16."""
        return file_type_name(self.file_type)

    def tensor_type_counts(self) -> dict[str, int]:
        return dict(Counter(t.type_name.upper() for t in self.tensors))

    def summary(self) -> dict:
        """What `cl3 info` shows (and prints as JSON)."""
        tokenizer: dict[str, object] = {"model": self.tokenizer_model, "pre": self.pre_tokenizer,
                                        "tokens": self.n_tokens, "merges": self.n_merges}
        for kind, tid in self.special_ids.items():
            tokenizer[f"{kind}_id"] = f"{tid} {self.special_texts[kind]!r}" if kind in self.special_texts else tid
        for kind, flag in (("bos", self.add_bos), ("eos", self.add_eos)):
            if flag is not None:
                tokenizer[f"add_{kind}"] = flag
        bpw = self.bits_per_weight
        return {
            "file": str(self.path), "type": self.general_type, "architecture": self.architecture, "name": self.name,
            "size_label": self.size_label, "file_type": self.file_type_name, "file_size_bytes": self.file_size,
            "parameters": self.n_params, "bits_per_weight": round(bpw, 4) if bpw else None,
            "tensor_count": len(self.tensors), "tensor_types": self.tensor_type_counts(), "hparams": self.hparams,
            "tokenizer": tokenizer, "chat_template": self.chat_template,
            **({"chat_template_source": self.chat_template_source} if self.chat_template else {}),
        }

    @property
    def chat_template_source(self) -> str:
        """Where the chat template came from (recorded by cl3 convert), in words."""
        from .chat_templates import NAME_KEY, SOURCE_KEY, describe_source

        return describe_source(self.values.get(SOURCE_KEY), self.values.get(NAME_KEY))

    def token_texts(self) -> list[str]:
        """Every token's text (reads the whole vocabulary: only where a check needs it)."""
        with GgufFile(self.path) as f:
            return [f.array_str(K.Tokenizer.LIST, i) for i in range(f.array_len(K.Tokenizer.LIST))]

    @property
    def effective_add_bos(self) -> bool:
        """llama.cpp's default for Llama vocabularies when the key is absent: add BOS."""
        return True if self.add_bos is None else self.add_bos


def bits_per_weight(tensor_bytes: int, n_params: int) -> float | None:
    return tensor_bytes * 8 / n_params if n_params else None


def file_type_name(file_type: int | None) -> str | None:
    if file_type is None:
        return None
    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"ftype {file_type}"


def read_metadata(path: str | os.PathLike) -> GgufMetadata:
    """The metadata of the GGUF at ``path``; one clear InputError for a missing, foreign or truncated file."""
    with GgufFile(path) as f:
        arch = f.get(K.General.ARCHITECTURE)
        n_tokens = f.array_len(K.Tokenizer.LIST)
        special_ids = {kind: int(v) for kind, key in SPECIAL_TOKEN_KEYS.items()
                       if (v := f.get(key)) is not None}
        special_texts = {kind: f.array_str(K.Tokenizer.LIST, i) for kind, i in special_ids.items()
                         if 0 <= i < n_tokens}
        types = f.array(K.Tokenizer.TOKEN_TYPE)
        control = frozenset(f.array_str(K.Tokenizer.LIST, int(i))
                            for i in np.nonzero(types == gguf.TokenType.CONTROL)[0]) if types is not None else frozenset()
        prefix = f"{arch}." if arch else None
        keys = f.keys()
        hparams = {k[len(prefix):]: _plain(f.get(k)) for k in keys if prefix and k.startswith(prefix)}
        sampling = {k.removeprefix(SAMPLING_PREFIX): _plain(f.get(k)) for k in keys
                    if k.startswith(SAMPLING_PREFIX) and k != K.General.SAMPLING_SEQUENCE}
        values = {k: f.get(k) for k in keys if not f.is_array(k)}
        add_bos, add_eos = f.get(K.Tokenizer.ADD_BOS), f.get(K.Tokenizer.ADD_EOS)
        return GgufMetadata(
            path=f.path, file_size=f.path.stat().st_size, general_type=f.get(K.General.TYPE) or "model",
            architecture=arch, name=f.get(K.General.NAME), basename=f.get(K.General.BASENAME),
            finetune=f.get(K.General.FINETUNE), version=f.get(K.General.VERSION),
            size_label=f.get(K.General.SIZE_LABEL), organization=f.get(K.General.ORGANIZATION),
            file_type=f.get(K.General.FILE_TYPE),
            context_length=f.get(K.LLM.CONTEXT_LENGTH.format(arch=arch)) if arch else None,
            chat_template=f.get(K.Tokenizer.CHAT_TEMPLATE), hparams=hparams,
            tokenizer_model=f.get(K.Tokenizer.MODEL), pre_tokenizer=f.get(K.Tokenizer.PRE), n_tokens=n_tokens,
            n_merges=f.array_len(K.Tokenizer.MERGES), special_ids=special_ids, special_texts=special_texts,
            add_bos=None if add_bos is None else bool(add_bos), add_eos=None if add_eos is None else bool(add_eos),
            control_tokens=control, sampling=sampling, license=f.get(K.General.LICENSE),
            license_name=f.get(K.General.LICENSE_NAME), license_link=f.get(K.General.LICENSE_LINK),
            tensors=list(f.tensors), values=values)


def _plain(value):
    """Numpy arrays as lists (JSON-friendly)."""
    return value.tolist() if isinstance(value, np.ndarray) else value
