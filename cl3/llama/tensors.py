"""ggml tensors seen from Python: the ``struct ggml_tensor`` mirror the imatrix callback reads, and ggml type sizes.

The mirror follows ggml/include/ggml.h of the llama.cpp that llama-cpp-python 0.3.36 (cl3's pin) vendors;
:func:`check_ggml_layout` compares it with the loaded library before first use.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..errors import LlamaError
from .library import declare, ggml_base, llama_cpp

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
GGML_OP_MUL_MAT = 29  # checked against ggml_op_name() by check_ggml_layout
GGML_OP_MUL_MAT_ID = 30
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): offs, size, next, type, padding[4]


class GgmlTensor(ctypes.Structure):
    """Mirror of ``struct ggml_tensor``."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@functools.cache
def check_ggml_layout() -> None:
    """Fail loudly if the mirrored structure or op numbers do not match the loaded libggml."""
    lib = ggml_base()
    expected = lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE
    if ctypes.sizeof(GgmlTensor) != expected:
        raise LlamaError(f"ggml_tensor layout mismatch ({ctypes.sizeof(GgmlTensor)} != {expected} bytes): "
                         "cl3 needs llama-cpp-python==0.3.36")
    if lib.ggml_op_name(GGML_OP_MUL_MAT) != b"MUL_MAT" or lib.ggml_op_name(GGML_OP_MUL_MAT_ID) != b"MUL_MAT_ID":
        raise LlamaError("ggml op numbering mismatch: cl3 needs llama-cpp-python==0.3.36")


def tensor_at(address: int) -> GgmlTensor:
    return GgmlTensor.from_address(address)


def tensor_name(t: GgmlTensor) -> str:
    return t.name.decode("utf-8", errors="replace")


def tensor_array(t: GgmlTensor, dtype=np.float32, *, copy: bool = False) -> np.ndarray:
    """The tensor's data as a (ne3, ne2, ne1, ne0) array honouring its strides.

    Host buffers are viewed in place (valid only inside the eval callback); device buffers (GPU offload), or any
    buffer with ``copy=True``, are copied with ``ggml_backend_tensor_get``, which works for every backend.
    """
    lib = ggml_base()
    address = ctypes.addressof(t)
    n_bytes = lib.ggml_nbytes(address)
    if not copy and t.buffer and lib.ggml_backend_buffer_is_host(t.buffer):
        buffer = (ctypes.c_char * n_bytes).from_address(t.data)
    else:
        buffer = bytearray(n_bytes)
        lib.ggml_backend_tensor_get(address, (ctypes.c_char * n_bytes).from_buffer(buffer), 0, n_bytes)
    shape = tuple(t.ne[i] for i in reversed(range(GGML_MAX_DIMS)))
    strides = tuple(t.nb[i] for i in reversed(range(GGML_MAX_DIMS)))
    return np.ndarray(shape, dtype=dtype, buffer=buffer, strides=strides)


def tensor_rows(t: GgmlTensor) -> int:
    return ggml_base().ggml_nrows(ctypes.addressof(t))


@functools.cache
def ggml_type_by_name(name: str) -> int:
    """A ggml tensor type by its ggml name (case-insensitive), as llama-quantize's parse_ggml_type."""
    lib = ggml_base()
    for i in range(llama_cpp().GGML_TYPE_COUNT):
        type_name = lib.ggml_type_name(i)
        if type_name and type_name.decode().lower() == name.lower():
            return i
    raise ValueError(name)


def ggml_type_name(ggml_type: int) -> str:
    name = ggml_base().ggml_type_name(ggml_type)
    return name.decode() if name else f"type{ggml_type}"


def tensor_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ggml type ``type_name`` and shape (rows..., ne0), from libggml's own ggml_row_size."""
    rows = 1
    for n in shape[:-1]:
        rows *= int(n)
    return rows * int(ggml_base().ggml_row_size(ggml_type_by_name(type_name), int(shape[-1])))


# ------------------------------------------------------------------------------------- quantize / dequantize rows

class _TypeTraits(ctypes.Structure):
    """Mirror of ``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def _quant_api() -> ctypes.CDLL:
    lib = ggml_base()
    c = ctypes
    declare(lib, "ggml_quantize_chunk", c.c_size_t, c.c_int, c.c_void_p, c.c_void_p, c.c_int64, c.c_int64, c.c_int64,
            c.c_void_p)
    declare(lib, "ggml_quantize_requires_imatrix", c.c_bool, c.c_int)
    declare(lib, "ggml_get_type_traits", c.POINTER(_TypeTraits), c.c_int)
    declare(lib, "ggml_blck_size", c.c_int64, c.c_int)
    declare(lib, "ggml_is_quantized", c.c_bool, c.c_int)
    return lib


@functools.cache
def _to_float(ggml_type: int):
    traits = _quant_api().ggml_get_type_traits(ggml_type).contents
    if not traits.to_float:
        raise LlamaError(f"ggml cannot dequantize {ggml_type_name(ggml_type)}")
    return _TO_FLOAT(traits.to_float)


def block_size(ggml_type: int) -> int:
    """Elements per quantization block (a row length must be a multiple of it)."""
    return int(_quant_api().ggml_blck_size(ggml_type))


def is_quantized(ggml_type: int) -> bool:
    return bool(_quant_api().ggml_is_quantized(ggml_type))


def requires_imatrix(ggml_type: int) -> bool:
    """ggml refuses to quantize to this type without an importance matrix (IQ1_*, IQ2_XXS/XS...)."""
    return bool(_quant_api().ggml_quantize_requires_imatrix(ggml_type))


def quantize_rows(ggml_type: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``rows`` (n_rows, n_per_row) quantized by ``ggml_quantize_chunk``, the call llama.cpp's quantizer makes for
    every tensor (same bytes); ``imatrix``: the per-column importances (n_per_row,). Returns the bytes (uint8)."""
    lib = _quant_api()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    out = np.empty(n_rows * int(lib.ggml_row_size(ggml_type, n_per_row)), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if weights is not None and weights.shape != (n_per_row,):
        raise ValueError(f"imatrix of {weights.size} values for rows of {n_per_row}")
    lib.ggml_quantize_chunk(ggml_type, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
                            None if weights is None else weights.ctypes.data)
    return out


def dequantize_rows(ggml_type: int, data: np.ndarray, n_rows: int, n_per_row: int) -> np.ndarray:
    """Bytes of ``n_rows`` rows of ``ggml_type`` back to float32, through ggml's own ``to_float``."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.size != n_rows * int(ggml_base().ggml_row_size(ggml_type, n_per_row)):
        raise ValueError("byte count does not match the rows")
    if ggml_type == GGML_TYPE_F32:  # ggml has no to_float for float32 itself
        return data.view(np.float32).reshape(n_rows, n_per_row).copy()
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    _to_float(ggml_type)(data.ctypes.data, out.ctypes.data, out.size)
    return out
