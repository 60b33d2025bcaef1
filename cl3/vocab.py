"""Tokenizer files of an HF checkpoint → the GGUF vocabulary (tokens, types, merges, special ids, chat template).

Byte-level BPE (Llama-3) comes from tokenizer.json; SentencePiece (Llama-2, Chinese-LLaMA-2) from tokenizer.model
(+ added_tokens.json). gguf-py's vocab readers do the parsing. The BPE pre-tokenizer that llama.cpp must use is
identified from tokenizer.json's own pre-tokenizer definition (its split regex), never from a hash of known models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .errors import InputError, UnsupportedModelError
from .hf import read_json

# The split regexes of tokenizer.json pre-tokenizers → llama.cpp's `tokenizer.ggml.pre` names (llama-vocab.cpp).
PRE_TOKENIZER_BY_REGEX = {
    # Llama-3, Llama-3.1/3.2/3.3, Chinese Llama-3 and their fine-tunes
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 and derivatives
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    # Mistral Nemo / tekken
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "tekken",
}
KNOWN_PRE_TOKENIZERS = sorted(set(PRE_TOKENIZER_BY_REGEX.values()) | {"gpt-2", "default"})

# Tokens that end an assistant turn in the chat formats cl3 knows; set as tokenizer.ggml.eot_token_id when present.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


@dataclass
class Vocab:
    model: str                       # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str                         # tokenizer.ggml.pre
    tokens: list[str | bytes]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab = field(repr=False)
    eot_id: int | None = None

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)
        if self.eot_id is not None:
            writer.add_eot_token_id(self.eot_id)


def load_vocab(path: Path, vocab_size: int, pre_tokenizer: str | None = None) -> Vocab:
    """Read the tokenizer of the checkpoint at `path`, padded to the model's `vocab_size`."""
    if (path / "tokenizer.json").exists() and _is_byte_level_bpe(path / "tokenizer.json"):
        vocab = _bpe_vocab(path, pre_tokenizer)
    elif (path / "tokenizer.model").exists():
        vocab = _spm_vocab(path)
    elif (path / "tokenizer.json").exists():
        raise UnsupportedModelError("tokenizer.json is not a byte-level BPE tokenizer and there is no tokenizer.model")
    else:
        raise InputError(f"no tokenizer in {path} (expected tokenizer.json or tokenizer.model)")
    n = len(vocab.tokens)
    if n > vocab_size:
        raise InputError(f"the tokenizer has {n} tokens but config.json says vocab_size = {vocab_size}")
    for i in range(n, vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(gguf.TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    vocab.special = _special_vocab(path, vocab_size, load_merges=vocab.model == "gpt2")
    if vocab.model == "gpt2" and not vocab.special.merges:
        raise InputError("tokenizer.json has no BPE merges")
    vocab.eot_id = next((vocab.tokens.index(t) for t in END_OF_TURN_TOKENS if t in vocab.tokens), None)
    return vocab


def _special_vocab(path: Path, n_vocab: int, load_merges: bool) -> gguf.SpecialVocab:
    try:
        return gguf.SpecialVocab(path, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, json.JSONDecodeError) as ex:
        raise InputError(f"cannot read the tokenizer's special tokens: {ex}") from None


def _is_byte_level_bpe(file: Path) -> bool:
    tj = read_json(file, "tokenizer.json")
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"


def identify_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from its pre_tokenizer definition."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    regexes = [r for r in regexes if r]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not regexes and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(regexes) == 1 and regexes[0] in PRE_TOKENIZER_BY_REGEX:
        return PRE_TOKENIZER_BY_REGEX[regexes[0]]
    shown = regexes[0] if regexes else json.dumps(pre)[:200]
    raise UnsupportedModelError(
        f"unknown BPE pre-tokenizer {shown!r}; if it behaves like a known one, name it "
        f"(one of: {', '.join(KNOWN_PRE_TOKENIZERS)})", param="pre_tokenizer")


def _bpe_vocab(path: Path, pre_tokenizer: str | None) -> Vocab:
    tokenizer_json = read_json(path / "tokenizer.json", "tokenizer.json")
    pre = pre_tokenizer or identify_pre_tokenizer(tokenizer_json)
    try:
        bpe = gguf.vocab.BpeVocab(path)
        entries = list(bpe.all_tokens())
    except (ValueError, KeyError) as ex:
        raise InputError(f"cannot read tokenizer.json: {ex}") from None
    tokens = [t if isinstance(t, str) else t.decode("utf-8") for t, _, _ in entries]
    types = [int(tt) for _, _, tt in entries]
    # added tokens: CONTROL when marked special, USER_DEFINED otherwise (gguf-py marks all of them CONTROL)
    for item in tokenizer_json.get("added_tokens") or []:
        i = item.get("id")
        if isinstance(i, int) and i < len(types):
            types[i] = gguf.TokenType.CONTROL if item.get("special", True) else gguf.TokenType.USER_DEFINED
    return Vocab("gpt2", pre, tokens, types, None, special=None)  # type: ignore[arg-type]


def _spm_vocab(path: Path) -> Vocab:
    try:
        spm = gguf.vocab.SentencePieceVocab(path)
        entries = list(spm.all_tokens())
    except (ValueError, RuntimeError, OSError) as ex:
        raise InputError(f"cannot read tokenizer.model: {ex}") from None
    tokens = [t for t, _, _ in entries]
    scores = [float(s) for _, s, _ in entries]
    types = [int(tt) for _, _, tt in entries]
    config = path / "tokenizer_config.json"
    if config.exists():  # added tokens declared only in tokenizer_config.json (e.g. a pad token appended to the vocab)
        for sid, item in (read_json(config, "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
            i = int(sid)
            if i == len(tokens):
                tokens.append(item["content"].encode("utf-8"))
                scores.append(-1000.0)
                types.append(gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED)
    return Vocab("llama", "default", tokens, types, scores, special=None)  # type: ignore[arg-type]
