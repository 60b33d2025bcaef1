"""ggml tensors seen from Python: the ``struct ggml_tensor`` mirror the imatrix callback reads, and ggml type sizes.

The mirror follows ggml/include/ggml.h of the llama.cpp that llama-cpp-python 0.3.36 (cl3's pin) vendors;
:func:`check_ggml_layout` compares it with the loaded library before first use.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..errors import LlamaError
from .library import ggml_base, llama_cpp

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
