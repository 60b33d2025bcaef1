"""Sizes of every quantization of a model before downloading its weights: llama.cpp plans them, cl3 adds them up.

From config.json (+ the tokenizer files, for the metadata's size) cl3 writes a *weight-less* F16 GGUF of the real
shapes — the header of what ``cl3 convert`` would write, with the data area left as a sparse hole, so nothing is
stored on disk — and runs llama.cpp's own quantizer on it in dry-run mode (``llama-quantize --dry-run``), which
decides every tensor's type with llama.cpp's rules without reading a weight. The file size is then the metadata plus
each tensor's bytes (rows × ggml row size for its type, padded to the GGUF alignment), the BPW the tensor bits over
the parameter count. No quantization rule is re-implemented here.

Memory to run a type at a context: weights + the f16 KV cache (2 × layers × context × kv-heads × head-dim × 2 bytes)
+ llama.cpp's compute buffer for that context, which llama.cpp reports when it plans a context on the same
weight-less model without allocating it (``no_alloc``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from . import llama
from .errors import InputError, UsageError
from .hf import read_json
from .metadata import bits_per_weight
from .progress import quiet_logger


@dataclass
class TypePlan:
    type: str                  # as asked (e.g. "Q4_K"), resolved with llama-quantize's aliases
    file_type: str             # llama-quantize's name (e.g. "Q4_K_M")
    size_bytes: int            # the GGUF file: metadata + padded tensor data
    size_gib: float
    tensor_bytes: int
    bpw: float                 # tensor bits / parameters
    n_params: int
    memory_bytes: int | None   # weights + KV cache + compute buffer at `ctx`
    memory_gib: float | None
    ctx: int | None
    tensor_types: dict[str, int]   # ggml type name → number of tensors of that type
    tokenizer: bool = True     # False: no tokenizer metadata was available, the size lacks it (a few MB)

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(src: str | os.PathLike) -> tuple[dict, Path | None]:
    """config.json of a local checkpoint directory, a config.json path, or a hub repo id (small files only)."""
    path = Path(src)
    if path.is_file() and path.name.endswith(".json"):
        return read_json(path, "config.json"), path.parent
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json")
        return read_json(path / "config.json", "config.json"), path
    from .hub import is_repo_id, resolve_source

    if not path.exists() and is_repo_id(str(src)):
        folder = resolve_source(str(src), config_only=True)
        return read_json(folder / "config.json", "config.json"), folder
    raise InputError(f"not a model directory, config.json or hub repo id: {src}")


@quiet_logger()
def write_weightless_gguf(config: dict, out: Path, *, tokenizer_dir: Path | None = None,
                          vocab_gguf: Path | None = None) -> tuple[int, dict[str, tuple[int, ...]], bool]:
    """The F16 GGUF ``cl3 convert`` would write for ``config``, with its data area a sparse hole of the right size.

    The tokenizer metadata comes from ``vocab_gguf`` (any GGUF's ``tokenizer.*`` keys, e.g. llama.cpp's
    models/ggml-vocab-*.gguf) or the tokenizer files in ``tokenizer_dir``; without either the file lacks it.
    Returns (metadata bytes, {tensor name: shape}, whether tokenizer metadata is included).
    """
    from .convert import add_hparams, expected_shapes, hparams, llama3_rope_factors, tensor_type
    from .hf import check_architecture

    check_architecture(config)
    hp = hparams(config)
    shapes = expected_shapes(hp)
    if config.get("tie_word_embeddings", False):
        del shapes["output.weight"]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(str(config.get("_name_or_path") or "plan"))
    writer.add_type(gguf.GGUFType.MODEL)
    add_hparams(writer, hp, config, "f16")  # general.quantization_version included, as every output carries it
    has_tokenizer = True
    if vocab_gguf is not None:
        _copy_tokenizer(vocab_gguf, writer, hp["vocab_size"])
    elif tokenizer_dir is not None and any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        from .vocab import load_vocab

        load_vocab(tokenizer_dir, hp["vocab_size"]).add_to_gguf(writer)
    else:
        has_tokenizer = False
        writer.add_tokenizer_model("none")  # llama.cpp's "no vocabulary": enough to plan a context
    tensors = [(name, shape, tensor_type(name, shape, "f16")) for name, shape in shapes.items()]
    if (freqs := llama3_rope_factors(config, hp)) is not None:
        tensors.append(("rope_freqs.weight", freqs.shape, gguf.GGMLQuantizationType.F32))
    data_bytes = 0
    for name, shape, qtype in tensors:
        nbytes = _tensor_bytes(qtype.name.lower(), shape)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    meta = fout.tell()
    writer.close()
    with open(out, "r+b") as f:
        f.truncate(meta + data_bytes)  # a hole: no disk blocks, reads as zeros
    return meta, {name: tuple(shape) for name, shape, _ in tensors}, has_tokenizer


def _copy_tokenizer(src: Path, writer: gguf.GGUFWriter, vocab_size: int) -> None:
    try:
        reader = gguf.GGUFReader(src)
    except (OSError, ValueError) as ex:
        raise InputError(f"cannot read the vocabulary GGUF {src}: {ex}") from None
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub == gguf.GGUFValueType.STRING:  # contents() is slow for 100k+ strings
            value = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        else:
            value = field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != vocab_size:
        raise InputError(f"{src} has {len(tokens.data)} tokens but config.json says vocab_size={vocab_size}")


def _tensor_bytes(type_name: str, shape) -> int:
    return llama.tensor_nbytes(type_name, tuple(shape))


def plan(src: str | os.PathLike, types: list[str] | None = None, *, ctx: int | None = 8192,
         vocab_gguf: str | os.PathLike | None = None, progress=None) -> list[TypePlan]:
    """Size, BPW and memory at ``ctx`` for each type (default: every file type llama.cpp can write)."""
    config, folder = load_config(src)
    from .quantize import resolve_types

    names = [resolve_types([t])[0].name for t in types] if types else list(llama.file_types())
    asked = types or names
    if ctx is not None and ctx < 1:
        raise UsageError("the context size must be positive")
    with tempfile.TemporaryDirectory(prefix="cl3-plan-") as tmp:
        model = Path(tmp) / "weightless-f16.gguf"
        meta, shapes, has_tokenizer = write_weightless_gguf(config, model, tokenizer_dir=folder,
                                                            vocab_gguf=Path(vocab_gguf) if vocab_gguf else None)
        runtime = _runtime_bytes(model, config, ctx) if ctx else None
        plans = []
        for i, (name, label) in enumerate(zip(names, asked)):
            tensor_types = llama.quantize_plan(model, llama.file_types()[name].ftype)
            missing = set(shapes) - set(tensor_types)
            if missing:
                raise InputError(f"llama.cpp's plan for {name} skipped {len(missing)} tensor(s), e.g. {min(missing)}")
            sizes = {t: _tensor_bytes(tensor_types[t], shapes[t]) for t in shapes}
            tensor_bytes = sum(sizes.values())
            file_bytes = meta + sum(gguf.GGUFWriter.ggml_pad(n, 32) for n in sizes.values())
            n_params = sum(int(np.prod(s)) for s in shapes.values())
            counts: dict[str, int] = {}
            for t in tensor_types.values():
                counts[t] = counts.get(t, 0) + 1
            mem = tensor_bytes + runtime if runtime is not None else None
            plans.append(TypePlan(type=label.upper(), file_type=name, size_bytes=file_bytes,
                                  size_gib=file_bytes / 2**30, tensor_bytes=tensor_bytes,
                                  bpw=bits_per_weight(tensor_bytes, n_params), n_params=n_params, memory_bytes=mem,
                                  memory_gib=mem / 2**30 if mem is not None else None, ctx=ctx,
                                  tensor_types=counts, tokenizer=has_tokenizer))
            if progress:
                progress(i + 1, len(names))
    return plans


def _runtime_bytes(model: Path, config: dict, ctx: int) -> int:
    """KV cache + compute buffer that llama.cpp would allocate for ``ctx`` tokens (planned, not allocated)."""
    sizes = llama.context_memory_plan(model, n_ctx=ctx)
    return sizes["kv_cache"] + sizes["compute"]
