"""Reading Hugging Face checkpoints without PyTorch: config, safetensors tensor index, chunked tensor reads.

Tensors are read with plain positioned reads (not a memory map), a few MiB at a time, so the resident memory of a
conversion does not grow with the model: a memory map would leave every page of a multi-GiB file resident.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf.utility import SafetensorsLocal

from .errors import InputError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SAFETENSORS_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}
CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live in a safetensors file."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (first axis), in its stored dtype."""
        row = self.n_elements // self.shape[0] if self.shape else 1
        count = (stop - start) * row
        with open(self.file, "rb") as f:
            data = np.fromfile(f, dtype=self.dtype, count=count, offset=self.offset + start * row * self.dtype.itemsize)
        if data.size != count:
            raise InputError(f"{self.file.name}: tensor {self.name} is truncated (file ends early)")
        return data.reshape((stop - start,) + self.shape[1:])

    def read(self) -> np.ndarray:
        return self.read_rows(0, self.shape[0]) if self.shape else self.read_rows(0, 1).reshape(())

    def row_chunks(self, rows_per_chunk: int | None = None, align: int = 1) -> Iterator[tuple[int, int]]:
        """Row ranges of about CHUNK_BYTES each (a multiple of `align` rows)."""
        n_rows = self.shape[0] if self.shape else 1
        row_bytes = max(1, self.nbytes // max(1, n_rows))
        step = rows_per_chunk or max(align, (CHUNK_BYTES // row_bytes) // align * align)
        for start in range(0, n_rows, step):
            yield start, min(n_rows, start + step)


@dataclass
class Checkpoint:
    """An HF model directory: parsed config.json and the index of every tensor in its safetensors files."""

    path: Path
    config: dict
    tensors: dict[str, TensorRef]

    @property
    def architecture(self) -> str:
        return architecture_of(self.config)

    def file_dtypes(self) -> set[str]:
        return {str(t.dtype) for t in self.tensors.values()}


def architecture_of(config: dict) -> str:
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InputError(f"config.json: architectures must be a list of names such as [\"LlamaForCausalLM\"], "
                         f"not {json.dumps(archs)[:80]}")
    return archs[0] if archs else str(config.get("model_type", "?"))


def check_architecture(config: dict) -> str:
    """The checkpoint's architecture, if cl3 handles it (Llama and Mistral layouts); else UnsupportedModelError."""
    arch = architecture_of(config)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {arch} is not supported (cl3 handles "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def check_model_source(path: str | os.PathLike) -> Path:
    """A model to quantize or bench: a GGUF file, or a Hugging Face model folder (with config.json)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such GGUF file or model folder: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} is a directory, not a GGUF file nor a Hugging Face model folder "
                             "(it has no config.json)")
        return path
    from .llama import check_gguf_path

    return check_gguf_path(path)


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as ex:
        raise InputError(f"{path.name} is not valid JSON ({ex})") from None
    except OSError as ex:
        raise InputError(f"cannot read {path}: {ex.strerror}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path.name} is not a JSON object")
    return data


def open_checkpoint(src: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Index a local HF checkpoint directory; raises InputError with a one-line reason on anything unusable."""
    path = Path(src)
    if not path.exists():
        raise InputError(f"no such model directory: {path}")
    if not path.is_dir():
        raise InputError(f"{path} is not a directory (expected a Hugging Face model directory with config.json)")
    config = read_json(path / "config.json", "config.json")
    files = _safetensors_files(path)
    if not files:
        pickles = sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
        if pickles and not allow_pickle:
            raise InputError(
                f"{path} has only PyTorch pickle weights ({pickles[0].name}); loading a pickle can run arbitrary code. "
                "Convert it to safetensors first, or allow pickles if you trust the file", param="allow_pickle")
        if pickles:
            raise UnsupportedModelError(
                "reading pickle checkpoints needs PyTorch, which cl3 does not use; convert them to safetensors first")
        raise InputError(f"no model weights (*.safetensors) in {path}")
    tensors: dict[str, TensorRef] = {}
    for file in files:
        tensors.update(index_safetensors(file))
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "model.safetensors.index.json").get("weight_map", {})
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise InputError(f"model.safetensors.index.json lists {len(missing)} tensor(s) not found in the shards, "
                             f"e.g. {missing[0]} (in {weight_map[missing[0]]})")
    return Checkpoint(path, config, tensors)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError("model.safetensors.index.json has no weight_map")
        files = sorted({path / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise InputError(f"missing shard {absent[0]} listed in model.safetensors.index.json")
        return files
    return sorted(path.glob("*.safetensors"))


def index_safetensors(file: Path) -> dict[str, TensorRef]:
    try:
        local = SafetensorsLocal(file)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as ex:
        raise InputError(f"{file.name} is not a valid safetensors file ({ex})") from None
    size = file.stat().st_size
    refs = {}
    for name, t in local.tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise UnsupportedModelError(f"{file.name}: tensor {name} has dtype {t.dtype}; cl3 reads BF16, F16 and F32")
        dtype = SAFETENSORS_DTYPES[t.dtype]
        r = t.data_range
        expected = int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
        if r.size != expected:
            raise InputError(f"{file.name}: tensor {name} has {r.size} bytes but shape {list(t.shape)} needs {expected}")
        if r.offset + r.size > size:
            raise InputError(f"{file.name} is truncated: tensor {name} ends at byte {r.offset + r.size}, "
                             f"the file has {size}")
        refs[name] = TensorRef(name, file, r.offset, r.size, dtype, tuple(int(d) for d in t.shape))
    return refs
