"""A GGUF's metadata and tensor directory through ggml's own C reader (``gguf_init_from_file`` without tensor data).

ggml parses the header in C, so even a 128k-token vocabulary opens in milliseconds; values come to Python only when
asked for, and string arrays element by element (see :meth:`GgufFile.array_str`).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .library import declare, ggml_base
from .log import log_errors_since, mark_log
from .tensors import GGML_MAX_DIMS, ggml_type_name

# enum gguf_type
GGUF_UINT8, GGUF_INT8, GGUF_UINT16, GGUF_INT16, GGUF_UINT32, GGUF_INT32, GGUF_FLOAT32, GGUF_BOOL, GGUF_STRING, \
    GGUF_ARRAY, GGUF_UINT64, GGUF_INT64, GGUF_FLOAT64 = range(13)
_SCALARS = {  # gguf type -> (getter suffix, ctypes type, numpy dtype)
    GGUF_UINT8: ("u8", ctypes.c_uint8, np.uint8), GGUF_INT8: ("i8", ctypes.c_int8, np.int8),
    GGUF_UINT16: ("u16", ctypes.c_uint16, np.uint16), GGUF_INT16: ("i16", ctypes.c_int16, np.int16),
    GGUF_UINT32: ("u32", ctypes.c_uint32, np.uint32), GGUF_INT32: ("i32", ctypes.c_int32, np.int32),
    GGUF_FLOAT32: ("f32", ctypes.c_float, np.float32), GGUF_BOOL: ("bool", ctypes.c_bool, np.bool_),
    GGUF_UINT64: ("u64", ctypes.c_uint64, np.uint64), GGUF_INT64: ("i64", ctypes.c_int64, np.int64),
    GGUF_FLOAT64: ("f64", ctypes.c_double, np.float64),
}


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.cache
def _api() -> ctypes.CDLL:
    lib = ggml_base()
    c, ctx, i64 = ctypes, ctypes.c_void_p, ctypes.c_int64
    declare(lib, "gguf_init_from_file", ctx, c.c_char_p, _InitParams)
    declare(lib, "gguf_free", None, ctx)
    declare(lib, "gguf_get_n_kv", i64, ctx)
    declare(lib, "gguf_find_key", i64, ctx, c.c_char_p)
    declare(lib, "gguf_get_key", c.c_char_p, ctx, i64)
    declare(lib, "gguf_get_kv_type", c.c_int, ctx, i64)
    declare(lib, "gguf_get_arr_type", c.c_int, ctx, i64)
    declare(lib, "gguf_get_arr_n", c.c_size_t, ctx, i64)
    declare(lib, "gguf_get_arr_data", c.c_void_p, ctx, i64)
    declare(lib, "gguf_get_arr_str", c.c_char_p, ctx, i64, c.c_size_t)
    declare(lib, "gguf_get_val_str", c.c_char_p, ctx, i64)
    for suffix, ctype, _ in _SCALARS.values():
        declare(lib, f"gguf_get_val_{suffix}", ctype, ctx, i64)
    declare(lib, "gguf_get_data_offset", c.c_size_t, ctx)
    declare(lib, "gguf_get_alignment", c.c_size_t, ctx)
    declare(lib, "gguf_get_n_tensors", i64, ctx)
    declare(lib, "gguf_get_tensor_name", c.c_char_p, ctx, i64)
    declare(lib, "gguf_get_tensor_type", c.c_int, ctx, i64)
    declare(lib, "gguf_get_tensor_ne", c.POINTER(c.c_int64), ctx, i64)
    declare(lib, "gguf_get_tensor_offset", c.c_size_t, ctx, i64)
    declare(lib, "gguf_get_tensor_size", c.c_size_t, ctx, i64)
    declare(lib, "gguf_set_val_u32", None, ctx, c.c_char_p, c.c_uint32)
    declare(lib, "gguf_set_val_str", None, ctx, c.c_char_p, c.c_char_p)
    declare(lib, "gguf_remove_key", i64, ctx, c.c_char_p)
    declare(lib, "gguf_set_tensor_type", None, ctx, c.c_char_p, c.c_int)
    declare(lib, "gguf_get_meta_size", c.c_size_t, ctx)
    return lib


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    ne: tuple[int, ...]   # ne[0..3], ggml order (row length first); 1 for unused dimensions
    offset: int           # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


def check_gguf_path(path: str | os.PathLike) -> Path:
    """The path, if it is a complete GGUF file (header readable, tensor data all there); otherwise one clear
    InputError, worded the same whichever command meets it."""
    with GgufFile(path) as f:
        return f.path


def _check_magic(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such GGUF file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a GGUF file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as ex:
        raise InputError(f"cannot read {path}: {ex.strerror}") from None
    if magic != b"GGUF":
        raise InputError(f"{path} is not a GGUF file (convert a checkpoint first with `cl3 convert`)")
    return path


class GgufFile:
    """An open GGUF header. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike):
        self._ctx = None
        self.path = _check_magic(path)
        lib = _api()
        mark = mark_log()
        self._ctx = lib.gguf_init_from_file(os.fsencode(self.path), _InitParams(True, None))
        if not self._ctx:
            raise InputError(f"{self.path} is not a readable GGUF file "
                             f"({log_errors_since(mark, 1) or 'damaged or truncated header'})")
        self._lib = lib
        try:
            self._keys = [self._name(lib.gguf_get_key(self._ctx, i), "key")
                          for i in range(lib.gguf_get_n_kv(self._ctx))]
            self.tensors = [self._tensor(i) for i in range(lib.gguf_get_n_tensors(self._ctx))]
        except InputError:
            self.close()
            raise
        self.data_offset = int(lib.gguf_get_data_offset(self._ctx))
        end = max((t.offset + t.nbytes for t in self.tensors), default=0)
        size = self.path.stat().st_size
        if self.tensors and self.data_offset + end > size:
            self.close()
            raise InputError(f"{self.path} is truncated: its tensors need {self.data_offset + end} bytes, "
                             f"the file has {size}")
        try:
            check_header(self)
        except InputError:
            self.close()
            raise

    def _name(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path} is damaged: a {what} name is not valid UTF-8 "
                             f"({raw[:60]!r})") from None

    def _tensor(self, i: int) -> TensorInfo:
        lib, ctx = self._lib, self._ctx
        ne = lib.gguf_get_tensor_ne(ctx, i)
        return TensorInfo(self._name(lib.gguf_get_tensor_name(ctx, i), "tensor"), lib.gguf_get_tensor_type(ctx, i),
                          tuple(int(ne[d]) for d in range(GGML_MAX_DIMS)), int(lib.gguf_get_tensor_offset(ctx, i)),
                          int(lib.gguf_get_tensor_size(ctx, i)))

    def close(self) -> None:
        if self._ctx:
            self._lib.gguf_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> GgufFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # keys
    def keys(self) -> list[str]:
        return list(self._keys)

    def kv_type(self, key: str) -> int | None:
        """The gguf_type of ``key`` (GGUF_ARRAY for arrays), or None when absent."""
        kid = self._id(key)
        return None if kid < 0 else int(self._lib.gguf_get_kv_type(self._ctx, kid))

    def array_type(self, key: str) -> int | None:
        """The element type of the array ``key``, or None when ``key`` is absent or not an array."""
        kid = self._id(key)
        if kid < 0 or self._lib.gguf_get_kv_type(self._ctx, kid) != GGUF_ARRAY:
            return None
        return int(self._lib.gguf_get_arr_type(self._ctx, kid))

    def _id(self, key: str) -> int:
        return self._lib.gguf_find_key(self._ctx, key.encode())

    def __contains__(self, key: str) -> bool:
        return self._id(key) >= 0

    def get(self, key: str, default=None):
        """The value of ``key``: int/float/bool/str, a numpy array for numeric arrays, a list for string arrays."""
        kid = self._id(key)
        if kid < 0:
            return default
        kind = self._lib.gguf_get_kv_type(self._ctx, kid)
        if kind not in _SCALARS and kind not in (GGUF_STRING, GGUF_ARRAY):
            return default
        if kind == GGUF_STRING:
            return self._lib.gguf_get_val_str(self._ctx, kid).decode("utf-8", errors="replace")
        if kind == GGUF_ARRAY:
            if self._lib.gguf_get_arr_type(self._ctx, kid) == GGUF_STRING:
                return [self.array_str(key, i) for i in range(self.array_len(key))]
            return self.array(key)
        suffix, _, _ = _SCALARS[kind]
        value = getattr(self._lib, f"gguf_get_val_{suffix}")(self._ctx, kid)
        return value.value if hasattr(value, "value") else value

    def is_array(self, key: str) -> bool:
        kid = self._id(key)
        return kid >= 0 and self._lib.gguf_get_kv_type(self._ctx, kid) == GGUF_ARRAY

    def array_len(self, key: str) -> int:
        kid = self._id(key)
        if kid < 0 or self._lib.gguf_get_kv_type(self._ctx, kid) != GGUF_ARRAY:
            return 0
        return int(self._lib.gguf_get_arr_n(self._ctx, kid))

    def array(self, key: str) -> np.ndarray | None:
        """A numeric array as a numpy copy (e.g. token types), or None."""
        kid = self._id(key)
        if kid < 0 or self._lib.gguf_get_kv_type(self._ctx, kid) != GGUF_ARRAY:
            return None
        kind = self._lib.gguf_get_arr_type(self._ctx, kid)
        if kind not in _SCALARS:
            return None
        n = int(self._lib.gguf_get_arr_n(self._ctx, kid))
        _, ctype, dtype = _SCALARS[kind]
        if n == 0:
            return np.zeros(0, dtype=dtype)
        data = self._lib.gguf_get_arr_data(self._ctx, kid)
        return np.ctypeslib.as_array((ctype * n).from_address(data)).astype(dtype, copy=True)

    def array_str(self, key: str, index: int) -> str:
        """Element ``index`` of a string array (e.g. one token's text) without reading the others."""
        kid = self._id(key)
        if kid < 0 or self.array_type(key) != GGUF_STRING or not 0 <= index < self.array_len(key):
            raise InputError(f"{self.path}: {key} has no string at index {index}")
        return self._lib.gguf_get_arr_str(self._ctx, kid, index).decode("utf-8", errors="replace")


GGML_QNT_VERSION = 2  # ggml.h; llama.cpp's quantizer writes it as general.quantization_version
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def quantized_file_size(src: str | os.PathLike, tensor_types: dict[str, int], ftype: int,
                        metadata: dict[str, str | int] | None = None) -> int:
    """The exact size of the GGUF llama.cpp's quantizer writes from ``src`` when tensor ``name`` gets ggml type
    ``tensor_types[name]`` (others keep theirs), as general.file_type ``ftype`` with ``metadata`` overrides.

    The header is built the way llama_model_quantize builds it (the source's keys, quantization version, file type,
    the overrides as strings or u32, split keys removed), by ggml's own gguf code, and measured with
    ``gguf_get_meta_size``; each tensor's data is padded to the alignment.
    """
    path = check_gguf_path(src)
    lib = _api()
    mark = mark_log()
    ctx = lib.gguf_init_from_file(os.fsencode(path), _InitParams(True, None))
    if not ctx:
        raise InputError(f"{path} is not a readable GGUF file ({log_errors_since(mark, 1) or 'damaged header'})")
    try:
        lib.gguf_set_val_u32(ctx, b"general.quantization_version", GGML_QNT_VERSION)
        lib.gguf_set_val_u32(ctx, b"general.file_type", ftype)
        for key in _SPLIT_KEYS:
            lib.gguf_remove_key(ctx, key.encode())
        for key, value in (metadata or {}).items():
            if isinstance(value, int):
                lib.gguf_set_val_u32(ctx, key.encode(), abs(value))
            else:
                lib.gguf_set_val_str(ctx, key.encode(), str(value).encode()[:127])
        for name, ggml_type in tensor_types.items():
            lib.gguf_set_tensor_type(ctx, name.encode(), ggml_type)
        alignment = int(lib.gguf_get_alignment(ctx))
        data = sum(-(-int(lib.gguf_get_tensor_size(ctx, i)) // alignment) * alignment
                   for i in range(lib.gguf_get_n_tensors(ctx)))
        return int(lib.gguf_get_meta_size(ctx)) + data
    finally:
        lib.gguf_free(ctx)


from .gguf_check import check_header  # noqa: E402 - it reads GgufFile's safe accessors
