"""PEFT LoRA adapters without PyTorch: merge into an HF checkpoint, or export as a llama.cpp LoRA GGUF.

merge():  W' = W + scale · B·A for every adapted linear layer (scale = alpha/r, or alpha/√r with rsLoRA, per-module
          alpha/rank patterns honoured), full `modules_to_save` replacements (embed_tokens / lm_head, possibly with a
          larger vocabulary: config.json's vocab_size follows and the adapter's tokenizer files win). Streams the base
          shard by shard and row chunk by row chunk, so the resident memory is a chunk plus the adapter.
export_lora_gguf(): the file llama.cpp's convert_lora_to_gguf.py writes (general.type = adapter, adapter.lora.alpha,
          blk.N.*.weight.lora_a / .lora_b), loadable at run time with llama.cpp's --lora.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np

from .convert import expected_shapes, hparams, permute_qk_rows
from .errors import InputError, OutputError, UnsupportedModelError, UsageError
from .files import atomic_output, check_new_output, is_directory_target, output_directory
from .hf import TensorRef, check_architecture, index_safetensors, open_checkpoint, read_json
from .progress import quiet_logger

Progress = Callable[[int, int], None]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
COPIED_FILES = ("generation_config.json",)
OUT_DTYPES = {"bf16": (np.dtype(ml_dtypes.bfloat16), "BF16", "bfloat16"), "f16": (np.dtype(np.float16), "F16", "float16"),
              "f32": (np.dtype(np.float32), "F32", "float32")}
FULL_REPLACEMENTS = ("model.embed_tokens.weight", "lm_head.weight")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


@dataclass
class LoraPair:
    module: str          # base module name, e.g. model.layers.0.self_attn.q_proj
    a: TensorRef         # (r, in)   [lora_embedding_A: (r, vocab)]
    b: TensorRef         # (out, r)  [lora_embedding_B: (hidden, r)]
    scale: float
    embedding: bool = False

    @property
    def base_name(self) -> str:
        return self.module + ".weight"

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of scale·B·A in the base weight's (out, in) layout, float32."""
        a = self.a.read().astype(np.float32)
        if self.embedding:  # PEFT's Embedding: ΔW = (B·A)ᵀ, shape (vocab, hidden)
            return self.scale * (a[:, start:stop].T @ self.b.read().astype(np.float32).T)
        return self.scale * (self.b.read_rows(start, stop).astype(np.float32) @ a)


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    pairs: dict[str, LoraPair] = field(default_factory=dict)        # by base tensor name
    replacements: dict[str, TensorRef] = field(default_factory=dict)  # modules_to_save: base tensor name -> full tensor

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha") or 0)

    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in TOKENIZER_FILES)


def open_adapter(src: str | os.PathLike, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path = Path(src)
    if not path.is_dir():
        raise InputError(f"no such adapter directory: {path}")
    config = read_json(path / "adapter_config.json", "adapter_config.json")
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise UnsupportedModelError(f"{path.name}: PEFT type {config.get('peft_type')!r} is not supported "
                                    "(cl3 merges LoRA adapters only)")
    if config.get("use_dora"):
        raise UnsupportedModelError(f"{path.name}: DoRA adapters (use_dora) are not supported")
    if str(config.get("bias", "none")) != "none":
        raise UnsupportedModelError(f"{path.name}: adapters with trained biases (bias={config['bias']!r}) are not "
                                    "supported (Llama layers have no bias)")
    _check_numbers(config)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            if not allow_pickle:
                raise InputError(f"{path.name} has only adapter_model.bin, a PyTorch pickle (loading one can run "
                                 "arbitrary code); convert it to safetensors, or allow pickles if you trust it",
                                 param="allow_pickle")
            raise UnsupportedModelError("reading adapter_model.bin needs PyTorch, which cl3 does not use; convert it "
                                        "to adapter_model.safetensors first (e.g. with PEFT's save_pretrained)")
        raise InputError(f"no adapter weights (adapter_model.safetensors) in {path}")
    adapter = LoraAdapter(path, config)
    halves: dict[str, dict[str, TensorRef]] = {}
    for key, ref in index_safetensors(weights).items():
        if m := _LORA_KEY.match(key):
            halves.setdefault(m["module"], {})[m["kind"]] = ref
            continue
        name = key.removeprefix("base_model.model.")
        if name.endswith("modules_to_save.default.weight"):
            name = name.replace(".modules_to_save.default", "")
        if name not in FULL_REPLACEMENTS:
            raise UnsupportedModelError(f"{weights.name}: unexpected tensor {key} (neither a LoRA A/B matrix nor an "
                                        "embed_tokens / lm_head replacement)")
        adapter.replacements[name] = ref
    for module, parts in halves.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise InputError(f"{weights.name}: {module} has only one of the two LoRA matrices")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"{weights.name}: {module} has LoRA matrices of incompatible shapes "
                             f"{list(a.shape)} and {list(b.shape)}")
        rank = _pattern_value(module, config.get("rank_pattern"), config.get("r"))
        if rank is not None and rank != a.shape[0]:
            raise InputError(f"adapter_config.json gives {module} rank {rank}, but its LoRA matrices have rank "
                             f"{a.shape[0]} (inconsistent adapter)")
        _check_targeted(module, config)
        adapter.pairs[module + ".weight"] = LoraPair(module, a, b, _scale(module, a.shape[0], config), embedding)
    if not adapter.pairs and not adapter.replacements:
        raise InputError(f"{weights.name} holds no LoRA weights")
    return adapter


def _check_numbers(config: dict) -> None:
    """lora_alpha, r and their per-module patterns are numbers (the scale is computed from them)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0

    for key in ("lora_alpha", "r"):
        if config.get(key) is not None and not number(config[key]):
            raise InputError(f"adapter_config.json: {key} must be a positive number, not {json.dumps(config[key])}")
    for key, integer in (("alpha_pattern", False), ("rank_pattern", True)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(
                number(v) and (not integer or isinstance(v, int)) for v in patterns.values()):
            raise InputError(f"adapter_config.json: {key} must map module names to positive numbers, "
                             f"not {json.dumps(patterns)[:80]}")
    if isinstance(config.get("r"), float):
        raise InputError(f"adapter_config.json: r must be an integer, not {config['r']}")


def check_adapter_fits(lora: LoraAdapter, base_shape: Callable[[LoraPair], tuple[int, ...] | None],
                       arch: str) -> None:
    """Every LoRA pair updates a weight the base has, with that weight's shape: the one check `cl3 merge` and
    `cl3 convert --lora` share. ``base_shape(pair)``: the base weight's (out, in) shape, None when it has none."""
    for pair in lora.pairs.values():
        shape = base_shape(pair)
        if shape is None:
            raise InputError(f"the adapter adapts {pair.module}, which the base model ({arch}) does not have "
                             "(adapter for another architecture?)")
        delta_shape = (pair.a.shape[1], pair.b.shape[0]) if pair.embedding else (pair.b.shape[0], pair.a.shape[1])
        if tuple(shape) != delta_shape:
            raise InputError(f"the adapter's {pair.module} makes a {list(delta_shape)} update but the base weight is "
                             f"{list(shape)} (adapter for another model size?)")


def _pattern_value(module: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _scale(module: str, rank: int, config: dict) -> float:
    alpha = float(_pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha", 8)))
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def _check_targeted(module: str, config: dict) -> None:
    targets = config.get("target_modules")
    if targets in (None, "all-linear"):
        return
    if isinstance(targets, str):  # PEFT: a regex over the full module name (some hand-written configs: "q_proj,v_proj")
        names = [t.strip() for t in targets.split(",")]
        ok = re.fullmatch(targets, module) is not None or any(module.endswith("." + t) for t in names)
    else:
        ok = any(module == t or module.endswith("." + t) for t in targets)
    if not ok:
        raise InputError(f"adapter_config.json: the weights adapt {module}, which target_modules {targets!r} "
                         "does not name (inconsistent adapter)")


# --- merge ---------------------------------------------------------------------------------------------------------

@dataclass
class MergeResult:
    path: Path
    n_merged: int          # LoRA pairs folded in
    n_replaced: int        # modules_to_save tensors taken whole
    vocab_size: int
    dtype: str


@dataclass
class MergePlan:
    """A validated merge, ready to run: every check that can fail on bad input has passed."""

    ckpt: object
    lora: LoraAdapter
    out: Path
    dtype: str
    config: dict
    shards: dict[str, list[tuple[str, TensorRef]]]

    def run(self, progress: Progress | None = None) -> MergeResult:
        lora, storage = self.lora, OUT_DTYPES[self.dtype][0]
        total = sum(int(np.prod(ref.shape)) * storage.itemsize for tensors in self.shards.values() for _, ref in tensors)
        done = 0
        weight_map: dict[str, str] = {}
        _check_output_dir(self.out)
        with atomic_output(self.out, directory=True) as tmp:
            for file_name, tensors in self.shards.items():
                for name, _ in tensors:
                    weight_map[name] = file_name
                with _SafetensorsStream(tmp / file_name, [(n, r.shape) for n, r in tensors], self.dtype) as writer:
                    for name, ref in tensors:
                        pair = lora.pairs.get(name)
                        for start, stop in ref.row_chunks():
                            rows = ref.read_rows(start, stop)
                            if pair is not None:
                                rows = rows.astype(np.float32) + pair.delta_rows(start, stop)
                            writer.write(rows.astype(storage))
                            done += rows.size * storage.itemsize
                            if progress:
                                progress(done, total)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False))
            tokenizer_src = lora.path if lora.has_tokenizer() else self.ckpt.path
            for f in TOKENIZER_FILES:
                if (tokenizer_src / f).is_file():
                    shutil.copyfile(tokenizer_src / f, tmp / f)
            for f in COPIED_FILES:
                if (self.ckpt.path / f).is_file():
                    shutil.copyfile(self.ckpt.path / f, tmp / f)
        return MergeResult(self.out, len(lora.pairs), len(lora.replacements), self.config["vocab_size"], self.dtype)


def plan_merge(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "auto",
               allow_pickle: bool = False) -> MergePlan:
    """Open and cross-check the base checkpoint and the adapter; raises a Cl3Error on anything unusable."""
    if dtype not in ("auto", *OUT_DTYPES):
        raise UsageError(f"unknown dtype {dtype!r}; choose bf16, f16, f32 or auto (the base's)", param="dtype")
    out = Path(out)
    _check_output_dir(out)
    ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
    lora = open_adapter(adapter, allow_pickle=allow_pickle)
    if dtype == "auto":
        first = next(iter(ckpt.tensors.values())).dtype
        dtype = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}.get(first, "bf16")
    config = dict(ckpt.config)
    vocab = _check_fit(ckpt, lora, config)
    # each output shard mirrors a base shard; a tied lm_head that the adapter replaces gets added
    shards: dict[str, list[tuple[str, TensorRef]]] = {}
    for name, ref in ckpt.tensors.items():
        shards.setdefault(ref.file.name, []).append((name, lora.replacements.get(name, ref)))
    if "lm_head.weight" in lora.replacements and "lm_head.weight" not in ckpt.tensors:
        shards[next(reversed(shards))].append(("lm_head.weight", lora.replacements["lm_head.weight"]))
        config["tie_word_embeddings"] = False
    config["vocab_size"] = vocab
    config["torch_dtype"] = OUT_DTYPES[dtype][2]
    return MergePlan(ckpt, lora, out, dtype, config, shards)


def merge(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "auto",
          allow_pickle: bool = False, progress: Progress | None = None) -> MergeResult:
    """Merge the LoRA adapter into the base checkpoint; write a standard HF directory at `out`.

    ΔW = scale·B·A in the base's (out, in) layout. PEFT's fan_in_fan_out concerns GPT-2-style Conv1D weights stored
    (in, out); PEFT switches it off for nn.Linear, which is all Llama has, so it changes nothing here either.
    """
    return plan_merge(base, adapter, out, dtype=dtype, allow_pickle=allow_pickle).run(progress)


def _check_fit(ckpt, lora: LoraAdapter, config: dict) -> int:
    """Every adapted tensor exists in the base with matching shapes; returns the merged vocabulary size."""
    arch = check_architecture(ckpt.config)
    check_adapter_fits(lora, lambda pair: ref.shape if (ref := ckpt.tensors.get(pair.base_name)) else None, arch)
    vocab = int(config["vocab_size"])
    hidden = int(config["hidden_size"])
    new_vocab = {}
    for name, ref in lora.replacements.items():
        if name in lora.pairs:
            raise InputError(f"the adapter has both a LoRA update and a full replacement for {name}")
        if len(ref.shape) != 2 or ref.shape[1] != hidden:
            raise InputError(f"the adapter's {name} is {list(ref.shape)}, but the base's hidden size is {hidden} "
                             "(adapter for another model?)")
        new_vocab[name] = ref.shape[0]
    if len(set(new_vocab.values())) > 1:
        raise InputError(f"the adapter's embed_tokens and lm_head have different vocabulary sizes {new_vocab}")
    if new_vocab:
        vocab = next(iter(new_vocab.values()))
        tied = "lm_head.weight" not in ckpt.tensors
        for name in FULL_REPLACEMENTS:
            if name not in lora.replacements and (name in ckpt.tensors) and ckpt.tensors[name].shape[0] != vocab:
                raise InputError(f"the adapter changes the vocabulary to {vocab} tokens but does not replace {name} "
                                 f"({ckpt.tensors[name].shape[0]} rows)")
        if tied and "model.embed_tokens.weight" not in lora.replacements and vocab != int(config["vocab_size"]):
            raise InputError("the adapter resizes lm_head of a model whose lm_head is tied to embed_tokens")
        if vocab != int(config["vocab_size"]) and not lora.has_tokenizer():
            raise InputError(f"the adapter resizes the vocabulary to {vocab} tokens but ships no tokenizer files")
    return vocab


def _check_output_dir(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputError(f"{path} already exists and is not empty; choose another output directory")



class _SafetensorsStream:
    """Write one safetensors file tensor by tensor (the safetensors library wants every tensor in memory at once).

    The header is computed up front from the names/shapes; data is then appended in order, chunk by chunk.
    """

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str):
        self.dtype, tag, _ = OUT_DTYPES[dtype]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.expected = 0
        for name, shape in tensors:
            n = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        self.expected = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        self.header = raw + b" " * (-len(raw) % 8)
        self.path = path
        self.written = 0

    def write(self, rows: np.ndarray) -> None:
        np.ascontiguousarray(rows, dtype=self.dtype).tofile(self.file)
        self.written += rows.nbytes

    def __enter__(self) -> _SafetensorsStream:
        self.file = self.path.open("wb")
        self.file.write(struct.pack("<Q", len(self.header)) + self.header)
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if exc[0] is None and self.written != self.expected:
            raise AssertionError(f"safetensors stream wrote {self.written} bytes, expected {self.expected}")


# --- llama.cpp LoRA GGUF -------------------------------------------------------------------------------------------

LORA_OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16}


@dataclass
class LoraGGUFResult:
    path: Path
    n_pairs: int
    alpha: float


@quiet_logger()
def export_lora_gguf(adapter: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
                     outtype: str = "f32", allow_pickle: bool = False, force: bool = False) -> LoraGGUFResult:
    """Write the adapter as a llama.cpp LoRA GGUF for the base model `base` (an HF directory, its config.json, or the
    base GGUF): tensor blk.N.<name>.weight.lora_a (r × in) / .lora_b (out × r), Q/K rows permuted like the base's.
    `out` is a file, or a directory for the default name {adapter}-LoRA-{TYPE}.gguf; outtype "auto" means f32."""
    lora = open_adapter(adapter, allow_pickle=allow_pickle)
    outtype = "f32" if outtype == "auto" else outtype
    if outtype not in LORA_OUTTYPES:
        raise UsageError(f"unknown adapter outtype {outtype!r}; choose f32, f16 or bf16")
    if lora.replacements:
        raise UnsupportedModelError(
            f"the adapter replaces {', '.join(sorted(lora.replacements))} entirely (modules_to_save); a llama.cpp LoRA "
            "adapter cannot carry that: merge it into the base with `cl3 merge` instead")
    n_layers, heads, kv_heads, shapes = _base_shape(Path(base))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    check_adapter_fits(lora, lambda pair: shapes.get(name_map.get_name(pair.base_name, try_suffixes=(".weight",))),
                       "llama")
    alpha = lora.alpha
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(adapter).resolve().name)
    qtype = LORA_OUTTYPES[outtype]
    tensors = []
    for pair in lora.pairs.values():
        if pair.embedding:
            raise UnsupportedModelError("LoRA on embed_tokens cannot be exported as a llama.cpp adapter by cl3; "
                                        "merge it with `cl3 merge` instead")
        name = name_map.get_name(pair.base_name, try_suffixes=(".weight",))
        if name is None or not pair.module.endswith(LINEAR_MODULES + ("lm_head",)):
            raise InputError(f"the adapter adapts {pair.module}, which a llama.cpp Llama model does not have")
        a = pair.a.read().astype(np.float32)
        b = pair.b.read().astype(np.float32)
        # llama.cpp applies alpha/rank; fold in whatever differs (rsLoRA, alpha_pattern)
        b *= pair.scale * pair.rank / alpha if alpha else pair.scale
        heads_for = heads if pair.module.endswith("q_proj") else kv_heads if pair.module.endswith("k_proj") else 0
        if heads_for:
            b = permute_qk_rows(b, b.shape[0] // heads_for)
        tensors += [(name + ".lora_a", a), (name + ".lora_b", b)]
    for tname, data in tensors:
        writer.add_tensor(tname, _gguf_encode(data, qtype), raw_dtype=qtype)
    if is_directory_target(out):
        out = output_directory(out) / f"{Path(adapter).resolve().name}-LoRA-{outtype.upper()}.gguf"
    out = Path(out)
    check_new_output(out, force)
    with atomic_output(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return LoraGGUFResult(out, len(lora.pairs), alpha)


def _gguf_encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return data.astype(ml_dtypes.bfloat16).view(np.uint16)
    return data


def _base_shape(base: Path) -> tuple[int, int, int, dict[str, tuple[int, ...]]]:
    """(layers, heads, kv heads, weight shapes by GGUF name in (out, in) order) of the base model, from an HF
    directory, a config.json or a GGUF."""
    if base.is_file() and base.suffix == ".gguf":
        from .metadata import read_metadata

        meta = read_metadata(base)
        if meta.architecture != "llama":
            raise UnsupportedModelError(f"the base GGUF is a {meta.architecture!r} model; cl3 exports adapters for "
                                        "llama models")

        def get(key: str) -> int:
            if key not in meta.hparams:
                raise InputError(f"the base GGUF lacks llama.{key}")
            return int(meta.hparams[key])
        heads = get("attention.head_count")
        kv = meta.hparams.get("attention.head_count_kv")
        shapes = {t.name: tuple(reversed([d for d in t.ne[:2]])) for t in meta.tensors}
        return get("block_count"), heads, int(kv) if kv is not None else heads, shapes
    config = read_json(base if base.suffix == ".json" else base / "config.json", "the base model's config.json")
    hp = hparams(config)
    return hp["layers"], hp["heads"], hp["kv_heads"], expected_shapes(hp)
