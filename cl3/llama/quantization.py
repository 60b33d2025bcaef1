"""Quantization through llama.cpp's own ``llama_model_quantize``: file types, the C imatrix array, dry-run plans."""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import LlamaError
from .library import llama_cpp as _llama_cpp
from .log import log_errors_since, log_listener, mark_log


@dataclass(frozen=True)
class FileType:
    name: str        # llama-quantize's spelling, e.g. "Q4_K_M"
    ftype: int       # enum llama_ftype
    needs_imatrix: bool = False


# llama-quantize's QUANT_OPTIONS (tools/quantize/quantize.cpp), in its order; aliases map onto these names.
_FTYPE_NAMES = [
    ("Q1_0", "LLAMA_FTYPE_MOSTLY_Q1_0"), ("Q2_0", "LLAMA_FTYPE_MOSTLY_Q2_0"),
    ("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1"),
    ("MXFP4_MOE", "LLAMA_FTYPE_MOSTLY_MXFP4_MOE"),
    ("Q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0"), ("Q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1"),
    ("IQ2_XXS", "LLAMA_FTYPE_MOSTLY_IQ2_XXS"), ("IQ2_XS", "LLAMA_FTYPE_MOSTLY_IQ2_XS"),
    ("IQ2_S", "LLAMA_FTYPE_MOSTLY_IQ2_S"), ("IQ2_M", "LLAMA_FTYPE_MOSTLY_IQ2_M"),
    ("IQ1_S", "LLAMA_FTYPE_MOSTLY_IQ1_S"), ("IQ1_M", "LLAMA_FTYPE_MOSTLY_IQ1_M"),
    ("TQ1_0", "LLAMA_FTYPE_MOSTLY_TQ1_0"), ("TQ2_0", "LLAMA_FTYPE_MOSTLY_TQ2_0"),
    ("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K"), ("Q2_K_S", "LLAMA_FTYPE_MOSTLY_Q2_K_S"),
    ("IQ3_XXS", "LLAMA_FTYPE_MOSTLY_IQ3_XXS"), ("IQ3_S", "LLAMA_FTYPE_MOSTLY_IQ3_S"),
    ("IQ3_M", "LLAMA_FTYPE_MOSTLY_IQ3_M"), ("IQ3_XS", "LLAMA_FTYPE_MOSTLY_IQ3_XS"),
    ("Q3_K_S", "LLAMA_FTYPE_MOSTLY_Q3_K_S"), ("Q3_K_M", "LLAMA_FTYPE_MOSTLY_Q3_K_M"),
    ("Q3_K_L", "LLAMA_FTYPE_MOSTLY_Q3_K_L"),
    ("IQ4_NL", "LLAMA_FTYPE_MOSTLY_IQ4_NL"), ("IQ4_XS", "LLAMA_FTYPE_MOSTLY_IQ4_XS"),
    ("Q4_K_S", "LLAMA_FTYPE_MOSTLY_Q4_K_S"), ("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    ("Q5_K_S", "LLAMA_FTYPE_MOSTLY_Q5_K_S"), ("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    ("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K"), ("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    ("F16", "LLAMA_FTYPE_MOSTLY_F16"), ("BF16", "LLAMA_FTYPE_MOSTLY_BF16"), ("F32", "LLAMA_FTYPE_ALL_F32"),
]
# Whole-file types whose tensors llama.cpp refuses to make without an imatrix (tensor_requires_imatrix in
# src/llama-quant.cpp: IQ1_*, IQ2_XXS/XS/S and IQ3_XXS tensors; Q2_K tensors of a Q2_K_S file).
_NEED_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}


_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


@functools.cache
def file_types() -> dict[str, FileType]:
    """Every file type this llama.cpp build can write, by llama-quantize's name."""
    llama_cpp = _llama_cpp()
    return {name: FileType(name, getattr(llama_cpp, const), name in _NEED_IMATRIX)
            for name, const in _FTYPE_NAMES if hasattr(llama_cpp, const)}


def quantize_file(src: pathlib.Path, dst: pathlib.Path, ftype: int, *, threads: int = 0,
                  imatrix: dict[str, np.ndarray] | None = None, metadata: dict[str, str | int] | None = None,
                  output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                  pure: bool = False, leave_output_tensor: bool = False, allow_requantize: bool = False,
                  tensor_types: list[tuple[str, int]] | None = None, dry_run: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Run ``llama_model_quantize(src, dst)``. ``imatrix`` maps weight names to per-column importances (float32,
    already divided by the counts), passed as the NULL-terminated ``llama_model_imatrix_data`` array llama.h offers;
    ``metadata`` becomes key/value overrides in the output (string or int values), as llama-quantize does.
    ``tensor_types``: (regex, ggml type) pairs, llama-quantize's ``--tensor-type`` (``tt_overrides``): the first
    pattern found in a tensor's name decides its type."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.pure = pure
    params.quantize_output_tensor = not leave_output_tensor
    params.allow_requantize = allow_requantize
    params.dry_run = dry_run
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type

    keep_alive: list = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            name_bytes = ctypes.c_char_p(name.encode())
            keep_alive += [values, name_bytes]
            entries[i].name = name_bytes.value
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None  # terminator
        keep_alive.append(entries)
        params.imatrix = entries
    if metadata:
        overrides = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()
        for i, (key, value) in enumerate(metadata.items()):
            kv = overrides[i]
            kv.key = key.encode()[:127]
            if isinstance(value, int):
                kv.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                kv.value.val_i64 = value
            else:
                kv.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                kv.value.val_str = str(value).encode()[:127]
        overrides[len(metadata)].key = b""  # terminator
        keep_alive.append(overrides)
        params.kv_overrides = overrides
    if tensor_types:
        patterns = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, ggml_type) in enumerate(tensor_types):
            text = ctypes.c_char_p(pattern.encode())
            keep_alive.append(text)
            patterns[i].pattern = text.value
            patterns[i].type = ggml_type
        patterns[len(tensor_types)].pattern = None  # terminator
        keep_alive.append(patterns)
        params.tt_overrides = patterns

    def on_line(line: str) -> None:  # llama.cpp logs "[  12/ 291] blk.0.attn_q.weight ..." per tensor
        match = _TENSOR_LINE.match(line)
        if match and progress is not None:
            progress(int(match.group(1)), int(match.group(2)))

    # llama_model_quantize cannot be cancelled; it runs in a daemon thread so Ctrl-C in the main thread is not held
    # up until it returns (the caller removes the partial output; the process then exits).
    outcome: list[int] = []
    worker = threading.Thread(target=lambda: outcome.append(llama_cpp.llama_model_quantize(
        str(src).encode(), str(dst).encode(), ctypes.byref(params))), name="llama_model_quantize", daemon=True)
    mark = mark_log()
    with log_listener(on_line):
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    rc = outcome[0] if outcome else -1
    if rc != 0:
        raise LlamaError(f"llama.cpp could not quantize {src.name}: {log_errors_since(mark) or 'unknown error'}")


_DRY_RUN_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s*(\S+),\s+size =.*?(?:\((\w+)\))?\s*$")


def quantize_plan(src: str | os.PathLike, ftype: int, *, tensor_types: list[tuple[str, int]] | None = None
                  ) -> dict[str, str]:
    """``llama-quantize --dry-run``: the ggml type llama.cpp's own rules give each tensor of ``src`` for ``ftype``.

    Nothing is written and no weight is read (a weight-less GGUF is enough). The decisions are read from the
    per-tensor lines llama.cpp logs during the dry run. Returns {tensor name: ggml type name}.
    """
    types: dict[str, str] = {}

    def on_line(line: str) -> None:
        if m := _DRY_RUN_LINE.match(line.strip()):
            types[m.group(1)] = m.group(3) or m.group(2)

    with log_listener(on_line):
        quantize_file(pathlib.Path(src), pathlib.Path(os.devnull), ftype, threads=1, tensor_types=tensor_types,
                      dry_run=True)
    if not types:
        raise LlamaError("llama.cpp's quantization dry run reported no tensors")
    return types
