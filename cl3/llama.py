"""The one boundary between cl3 and llama.cpp's C API (llama-cpp-python's ctypes bindings and its bundled libggml).

Everything that touches ``llama_cpp.llama_*`` functions, ctypes structures, ggml tensor mirrors or C callbacks lives
here, in small functions the pipeline stages call. The file is shared: each part is a clearly marked section.
The ctypes mirrors follow the llama.cpp sources vendored by llama-cpp-python 0.3.36 (the version cl3 pins).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import pathlib
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import InputError, LlamaError

# ======================================================================================================================
# Section: common — backend, library handles, log capture (owner: imatrix/quantize helper)
# ======================================================================================================================

_init_lock = threading.Lock()
_initialized = False


def _llama_cpp():
    """Import llama_cpp lazily (importing it loads the shared libraries) and initialise the backend once."""
    global _initialized
    import llama_cpp

    with _init_lock:
        if not _initialized:
            _install_log_handler(llama_cpp)
            llama_cpp.llama_backend_init()
            _initialized = True
    return llama_cpp


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """libggml-base bundled with llama-cpp-python (the same copy llama.cpp uses in this process)."""
    llama_cpp = _llama_cpp()
    # Open the very file libllama linked against (wheels hold copies, not symlinks: libggml-base.so would be a
    # second, separate instance of ggml with its own logger and state).
    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    names = ["libggml-base.so.0", "libggml-base.0.dylib", "ggml-base.dll", "libggml-base.so", "libggml-base.dylib"]
    path = next((lib_dir / n for n in names if (lib_dir / n).exists()), None)
    if path is None:
        raise LlamaError(f"libggml-base not found in {lib_dir}")
    lib = ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nrows.argtypes = [ctypes.c_void_p]
    lib.ggml_nrows.restype = ctypes.c_int64
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_tensor_overhead.argtypes = []
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


# llama.cpp's log lines are kept (not printed) so errors can quote them; CL3_LLAMA_LOG=1 prints them as they come.
_log_lines: collections.deque[tuple[int, int, str]] = collections.deque(maxlen=400)  # (serial, level, line)
_log_serial = [0]
_log_partial = [""]
_log_callback = None  # keep the ctypes callback alive
_log_listeners: list[Callable[[str], None]] = []
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5


def _install_log_handler(llama_cpp) -> None:
    global _log_callback
    echo = os.environ.get("CL3_LLAMA_LOG") == "1"
    last_level = [0]

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace") if text else ""
        if level == GGML_LOG_LEVEL_CONT:
            level = last_level[0]
        last_level[0] = level
        if echo:
            import sys

            sys.stderr.write(message)
        _log_partial[0] += message
        if "\n" in _log_partial[0]:
            *lines, _log_partial[0] = _log_partial[0].split("\n")
            for line in lines:
                if line.strip():
                    _log_serial[0] += 1
                    _log_lines.append((_log_serial[0], level, line))
                    for listener in list(_log_listeners):  # noqa: PERF101 - a copy: others may unsubscribe
                        listener(line)

    _log_callback = on_log
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))


@contextlib.contextmanager
def log_listener(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener(line)`` for every complete llama.cpp log line while the block runs."""
    _llama_cpp()
    _log_listeners.append(listener)
    try:
        yield
    finally:
        _log_listeners.remove(listener)


def mark_log() -> int:
    """A position in llama.cpp's log; pass it to :func:`log_errors_since`."""
    _llama_cpp()
    return _log_serial[0]


def log_errors_since(mark: int, last: int = 2) -> str:
    """The last error lines llama.cpp logged since ``mark``, joined into one line (for exception messages)."""
    errors = [text.strip(" =\t") for serial, level, text in list(_log_lines)
              if serial > mark and level == GGML_LOG_LEVEL_ERROR]
    errors = [e for e in errors if e]
    return "; ".join(errors[-last:])


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


GGUF_TYPE_STRING = 8


@dataclass
class GgufSummary:
    """A GGUF's tensor directory and string metadata, parsed by ggml's C reader (fast even with 128k-token vocabs)."""

    tensors: dict[str, tuple[int, tuple[int, ...]]]  # name -> (ggml type, ne[0..3])
    strings: dict[str, str]


@functools.cache
def _gguf_api() -> ctypes.CDLL:
    lib = ggml_base()
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    for name, restype in [("gguf_get_n_kv", ctypes.c_int64), ("gguf_get_n_tensors", ctypes.c_int64)]:
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = restype
    for name, restype in [("gguf_get_key", ctypes.c_char_p), ("gguf_get_kv_type", ctypes.c_int),
                          ("gguf_get_val_str", ctypes.c_char_p), ("gguf_get_tensor_name", ctypes.c_char_p),
                          ("gguf_get_tensor_type", ctypes.c_int),
                          ("gguf_get_tensor_ne", ctypes.POINTER(ctypes.c_int64))]:
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, name).restype = restype
    return lib


def read_gguf_summary(path: pathlib.Path) -> GgufSummary:
    lib = _gguf_api()
    mark = mark_log()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    if not ctx:
        raise InputError(f"{path} is not a readable GGUF file ({log_errors_since(mark, 1) or 'unknown error'})")
    try:
        strings = {}
        for i in range(lib.gguf_get_n_kv(ctx)):
            if lib.gguf_get_kv_type(ctx, i) == GGUF_TYPE_STRING:
                strings[lib.gguf_get_key(ctx, i).decode()] = lib.gguf_get_val_str(ctx, i).decode(errors="replace")
        tensors = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, i)
            tensors[lib.gguf_get_tensor_name(ctx, i).decode()] = (lib.gguf_get_tensor_type(ctx, i),
                                                                   tuple(ne[d] for d in range(GGML_MAX_DIMS)))
        return GgufSummary(tensors, strings)
    finally:
        lib.gguf_free(ctx)


# ======================================================================================================================
# Section: imatrix — model + context with a scheduler eval callback, ggml tensor mirror (owner: imatrix/quantize helper)
# ======================================================================================================================

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
GGML_OP_MUL_MAT = 29  # checked against ggml_op_name() when first used
GGML_OP_MUL_MAT_ID = 30


class GgmlTensor(ctypes.Structure):
    """Mirror of ``struct ggml_tensor`` (ggml/include/ggml.h of the vendored llama.cpp)."""

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


GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): offs, size, next, type, padding[4]


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
    buffer with ``copy=True``, are copied with ``ggml_backend_tensor_get``.
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


EvalCallback = Callable[[GgmlTensor, bool], bool]


class EvalModel:
    """A model and one context whose scheduler calls ``on_eval(tensor, ask)`` for every graph node.

    Mirrors what llama-imatrix sets up: no warm-up, every output requested, ``n_seq`` sequences side by side.
    """

    def __init__(self, path: pathlib.Path, *, n_ctx: int, n_batch: int, n_seq: int = 1, n_ubatch: int = 512,
                 n_threads: int | None = None, n_gpu_layers: int = 0, on_eval: EvalCallback | None = None) -> None:
        llama_cpp = _llama_cpp()
        check_ggml_layout()
        self._llama_cpp = llama_cpp
        self._model = None
        self._ctx = None
        self._batch = None
        self._callback_error: BaseException | None = None
        mark = mark_log()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise InputError(f"llama.cpp cannot load {path}: {log_errors_since(mark) or 'unknown error'}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = min(n_batch, n_ubatch)
        ctx_params.n_seq_max = n_seq
        threads = n_threads or os.cpu_count() or 1
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.no_perf = True
        if on_eval is not None:
            def trampoline(address: int, ask: bool, user_data) -> bool:
                try:
                    return on_eval(GgmlTensor.from_address(address), ask)
                except BaseException as ex:  # noqa: BLE001 - cannot cross the C boundary; raised after decode
                    self._callback_error = self._callback_error or ex
                    return not ask

            self._callback = llama_cpp.ggml_backend_sched_eval_callback(trampoline)
            ctx_params.cb_eval = self._callback
            ctx_params.cb_eval_user_data = None
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            self.close()
            raise LlamaError(f"llama.cpp cannot create a context: {log_errors_since(mark) or 'unknown error'}")
        llama_cpp.llama_set_warmup(self._ctx, False)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        data = text.encode("utf-8")
        capacity = len(data) + 2
        tokens = (self._llama_cpp.llama_token * capacity)()
        n = self._llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:
            raise LlamaError(f"tokenization failed ({n})")
        return np.ctypeslib.as_array(tokens)[:n].astype(np.int32)

    def clear(self) -> None:
        self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(self._ctx), True)

    def decode(self, parts: list[tuple[np.ndarray, int]]) -> None:
        """Decode one batch: for each sequence ``s``, ``parts[s] = (tokens, first position)``; every logit is kept
        (in batch order: sequence 0's tokens first)."""
        batch = self._batch
        token_buf = np.ctypeslib.as_array(batch.token, shape=(self.n_batch,))
        pos_buf = np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))
        n_seq_buf = np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))
        logits_buf = np.ctypeslib.as_array(ctypes.cast(batch.logits, ctypes.POINTER(ctypes.c_int8)),
                                           shape=(self.n_batch,))
        n = 0
        for seq, (tokens, first_pos) in enumerate(parts):
            k = len(tokens)
            token_buf[n:n + k] = tokens
            pos_buf[n:n + k] = np.arange(first_pos, first_pos + k, dtype=np.int32)
            for i in range(n, n + k):
                batch.seq_id[i][0] = seq
            n += k
        n_seq_buf[:n] = 1
        logits_buf[:n] = 1
        batch.n_tokens = n
        mark = mark_log()
        rc = self._llama_cpp.llama_decode(self._ctx, batch)
        if self._callback_error is not None:
            error, self._callback_error = self._callback_error, None
            raise error
        if rc != 0:
            raise LlamaError(f"llama_decode failed ({rc}): {log_errors_since(mark) or 'unknown error'}")

    def logits(self, n_tokens: int) -> np.ndarray:
        """The logits of the last decode, shape (n_tokens, n_vocab): a view, valid until the next decode."""
        ptr = self._llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_tokens * self.n_vocab,)).reshape(n_tokens, self.n_vocab)

    def close(self) -> None:
        if self._batch is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            self._llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> EvalModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ======================================================================================================================
# Section: quantize — llama_model_quantize with C-struct imatrix and metadata overrides (owner: imatrix/quantize helper)
# ======================================================================================================================

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
    import llama_cpp

    return {name: FileType(name, getattr(llama_cpp, const), name in _NEED_IMATRIX)
            for name, const in _FTYPE_NAMES if hasattr(llama_cpp, const)}


@functools.cache
def ggml_type_by_name(name: str) -> int:
    """A ggml tensor type by its ggml name (case-insensitive), as llama-quantize's parse_ggml_type."""
    import llama_cpp

    lib = ggml_base()
    for i in range(llama_cpp.GGML_TYPE_COUNT):
        type_name = lib.ggml_type_name(i)
        if type_name and type_name.decode().lower() == name.lower():
            return i
    raise ValueError(name)


def quantize_file(src: pathlib.Path, dst: pathlib.Path, ftype: int, *, threads: int = 0,
                  imatrix: dict[str, np.ndarray] | None = None, metadata: dict[str, str | int] | None = None,
                  output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                  pure: bool = False, leave_output_tensor: bool = False, allow_requantize: bool = False,
                  dry_run: bool = False, progress: Callable[[int, int], None] | None = None) -> None:
    """Run ``llama_model_quantize(src, dst)``. ``imatrix`` maps weight names to per-column importances (float32,
    already divided by the counts), passed as the NULL-terminated ``llama_model_imatrix_data`` array llama.h offers;
    ``metadata`` becomes key/value overrides in the output (string or int values), as llama-quantize does."""
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



# ======================================================================================================================
# --- evaluation: perplexity, KL divergence, speed ---  (owner: measure/bench helper)
# ======================================================================================================================
# Used by cl3.measure and cl3.plan. Mirrors what llama-perplexity / llama-bench / llama-quantize --dry-run do through
# llama.h: one model + context, batches of tokens in, output logits out; a threadpool like llama-bench's; the
# quantizer's dry run for per-tensor types.


def physical_cpu_count() -> int:
    """llama.cpp's default thread count (common_cpu_get_num_physical_cores): one thread per physical core."""
    import glob
    import os

    siblings = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings"):
        try:
            with open(path) as f:
                siblings.add(f.read().strip())
        except OSError:
            pass
    if siblings:
        return len(siblings)
    return max(1, (os.cpu_count() or 2) // 2) if (os.cpu_count() or 1) > 4 else (os.cpu_count() or 1)


def backend_info() -> dict:
    """Which ggml devices this llama-cpp-python build has, its version and llama.cpp's system-info line."""
    llama_cpp = _llama_cpp()
    devices = []
    try:
        lib = llama_cpp.llama_cpp._lib
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_name.restype = ctypes.c_char_p
        lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_description.restype = ctypes.c_char_p
        lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            devices.append({"name": lib.ggml_backend_dev_name(dev).decode(),
                            "description": lib.ggml_backend_dev_description(dev).decode()})
    except (AttributeError, OSError):
        pass
    gpu = [d["name"] for d in devices if not d["name"].upper().startswith("CPU")]
    backend = ",".join(sorted({n.rstrip("0123456789") for n in gpu})) if gpu else "CPU"
    return {
        "backend": backend,
        "devices": devices,
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }


class MeasureContext:
    """A model and a llama_context for scoring or timing: tokenize, decode batches, read output logits.

    ``n_seq`` sequences share the context (``n_ctx`` cells in all, like llama-perplexity's n_parallel); each decode
    call takes at most ``n_batch`` tokens.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int, n_batch: int, n_ubatch: int = 512,
                 n_seq: int = 1, n_threads: int | None = None, n_gpu_layers: int = 0, flash_attn: str = "auto",
                 threadpool: bool = False):
        llama_cpp = _llama_cpp()
        self._llama = llama_cpp
        self.path = os.fspath(model_path)
        if not os.path.isfile(self.path):
            raise InputError(f"model not found: {self.path}")
        self.n_threads = n_threads or physical_cpu_count()
        self._model = self._ctx = self._batch = self._pool = None
        mark = mark_log()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise InputError(f"llama.cpp cannot load {self.path}: {log_errors_since(mark) or 'not a model it supports'}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(self._vocab))
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.n_params = int(llama_cpp.llama_model_n_params(self._model))
        self.model_bytes = int(llama_cpp.llama_model_size(self._model))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, buf, len(buf))
        self.description = buf.value.decode(errors="replace")

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch, n_batch)
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.flash_attn_type = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                   "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise LlamaError(f"llama.cpp cannot create a context of {n_ctx} tokens for {self.path}: "
                             f"{log_errors_since(mark) or 'out of memory?'}")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        if threadpool:
            self._pool = _ThreadPool.attach(self._ctx, self.n_threads)

    # -- tokens in, logits out
    def tokenize(self, text: str) -> np.ndarray:
        """Tokens of ``text`` as llama.cpp's common_tokenize(ctx, text, add_special=true, parse_special=false)."""
        data = text.encode("utf-8")
        n_max = len(data) + 2 * int(self.add_bos) + 16
        out = (self._llama.llama_token * n_max)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), out, n_max, True, False)
        if n < 0:
            out = (self._llama.llama_token * -n)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), out, -n, True, False)
        return np.ctypeslib.as_array(out)[:n].astype(np.int32)

    def clear(self) -> None:
        self._llama.llama_memory_clear(self._llama.llama_get_memory(self._ctx), True)

    def decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, output: np.ndarray) -> int:
        """Decode one batch (at most n_batch tokens); return how many outputs (logit rows) it produced."""
        n = len(tokens)
        if n > self.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch={self.n_batch}")
        b = self._batch
        b.n_tokens = n
        np.ctypeslib.as_array(b.token, shape=(self.n_batch,))[:n] = tokens
        np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))[:n] = pos
        np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:n] = 1
        np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))[:n] = output
        for i, s in enumerate(seq.tolist()):
            b.seq_id[i][0] = s
        mark = mark_log()
        ret = self._llama.llama_decode(self._ctx, b)
        if ret != 0:
            raise LlamaError(f"llama_decode failed ({ret}) on a batch of {n} tokens: {log_errors_since(mark)}")
        return int(np.count_nonzero(output))

    def logits(self, n_outputs: int, *, copy: bool = True) -> np.ndarray:
        """The output logits of the last decode, shape (n_outputs, n_vocab), float32. Without ``copy`` the array
        views llama.cpp's buffer and is only valid until the next decode."""
        ptr = self._llama.llama_get_logits(self._ctx)
        view = np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))
        return view.copy() if copy else view

    def synchronize(self) -> None:
        self._llama.llama_synchronize(self._ctx)

    def close(self) -> None:
        if self._batch is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            self._llama.llama_free(self._ctx)
            self._ctx = None
        if self._pool is not None:
            self._pool.free()
            self._pool = None
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> MeasureContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ThreadPool:
    """A ggml CPU threadpool attached to a context, as llama-bench does (poll 50): without it ggml makes a fresh
    pool for every graph, which costs time per generated token."""

    _MAX_THREADS = 512

    class _Params(ctypes.Structure):
        _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                    ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]

    def __init__(self, cpu_lib, pool):
        self._cpu_lib, self._pool = cpu_lib, pool

    @classmethod
    def attach(cls, ctx, n_threads: int) -> _ThreadPool | None:
        llama_cpp = _llama_cpp()
        try:
            lib_dir = os.path.dirname(llama_cpp.llama_cpp._lib._name)
            # the file libllama linked against (wheels hold copies: libggml-cpu.so would be a second, separate ggml)
            names = [n for n in ("libggml-cpu.so.0", "libggml-cpu.0.dylib", "ggml-cpu.dll", "libggml-cpu.so",
                                 "libggml-cpu.dylib") if os.path.exists(os.path.join(lib_dir, n))]
            cpu_lib = ctypes.CDLL(os.path.join(lib_dir, names[0]))
            base = llama_cpp.llama_cpp._lib
            base.ggml_threadpool_params_default.restype = cls._Params
            base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
            cpu_lib.ggml_threadpool_new.restype = ctypes.c_void_p
            cpu_lib.ggml_threadpool_new.argtypes = [ctypes.POINTER(cls._Params)]
            cpu_lib.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
            base.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        except (AttributeError, OSError, ValueError, IndexError):
            return None
        params = base.ggml_threadpool_params_default(n_threads)
        params.poll = 50
        pool = cpu_lib.ggml_threadpool_new(ctypes.byref(params))
        if not pool:
            return None
        base.llama_attach_threadpool(ctx, pool, None)
        return cls(cpu_lib, pool)

    def free(self) -> None:
        self._cpu_lib.ggml_threadpool_free(self._pool)


_DRY_RUN_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s*(\S+),\s+size =.*?(?:\((\w+)\))?\s*$")


def quantize_plan(src: str | os.PathLike, ftype: int) -> dict[str, str]:
    """``llama-quantize --dry-run``: the ggml type llama.cpp's own rules give each tensor of ``src`` for ``ftype``.

    Nothing is written and no weight is read (a weight-less GGUF is enough). The decisions are read from the
    per-tensor lines llama.cpp logs during the dry run. Returns {tensor name: ggml type name}.
    """
    types: dict[str, str] = {}

    def on_line(line: str) -> None:
        if m := _DRY_RUN_LINE.match(line.strip()):
            types[m.group(1)] = m.group(3) or m.group(2)

    with log_listener(on_line):
        quantize_file(pathlib.Path(src), pathlib.Path(os.devnull), ftype, threads=1, dry_run=True)
    if not types:
        raise LlamaError("llama.cpp's quantization dry run reported no tensors")
    return types


_KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB")
_COMPUTE_LINE = re.compile(r"(\S+) compute buffer size =\s*([\d.]+) MiB")


def context_memory_plan(model_path: str | os.PathLike, *, n_ctx: int, n_batch: int = 2048, n_ubatch: int = 512,
                        n_gpu_layers: int = 0) -> dict[str, int]:
    """What llama.cpp would allocate for a context of ``n_ctx`` tokens, planned without allocating anything.

    The model is opened with ``no_alloc`` (as llama.cpp's own memory-fitting pass does: no weight is read, so a
    weight-less GGUF works) and the KV-cache and compute-buffer sizes llama.cpp reports are collected.
    Returns {"kv_cache": bytes, "compute": bytes} (reported in MiB with two decimals).
    """
    llama_cpp = _llama_cpp()
    found = {"kv_cache": None, "compute": 0}

    def on_line(line: str) -> None:
        if m := _KV_LINE.search(line):
            found["kv_cache"] = round(float(m.group(1)) * 2**20)
        elif m := _COMPUTE_LINE.search(line):
            found["compute"] += round(float(m.group(2)) * 2**20)

    mark = mark_log()
    mparams = llama_cpp.llama_model_default_params()
    mparams.no_alloc = True
    mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    mparams.n_gpu_layers = n_gpu_layers
    with log_listener(on_line):
        model = llama_cpp.llama_model_load_from_file(os.fspath(model_path).encode(), mparams)
        if not model:
            raise InputError(f"llama.cpp cannot read {model_path}: {log_errors_since(mark) or 'unknown error'}")
        try:
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, min(n_ubatch, n_batch)
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                raise LlamaError(f"llama.cpp cannot plan a context of {n_ctx}: {log_errors_since(mark) or '?'}")
            llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)
    if found["kv_cache"] is None:
        raise LlamaError("llama.cpp did not report the KV-cache size")
    return found


def tensor_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ggml type ``type_name`` and shape (rows..., ne0), from libggml's own ggml_row_size."""
    lib = ggml_base()
    if not getattr(lib.ggml_row_size, "_cl3_typed", False):
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size._cl3_typed = True
    rows = 1
    for n in shape[:-1]:
        rows *= int(n)
    return rows * int(lib.ggml_row_size(ggml_type_by_name(type_name), int(shape[-1])))


# --- end of section: evaluation ---


# ======================================================================================================================
# --- chat --- (owner: chat helper)
# ======================================================================================================================
# Used by cl3.chat, which otherwise talks to llama-cpp-python's high-level Llama class.


def install_log_capture() -> None:
    """Route llama.cpp's log into cl3's capture (not the terminal) before a llama_cpp.Llama is created."""
    _llama_cpp()


def eog_token_ids(llm) -> frozenset[int]:
    """Every end-of-generation token of a ``llama_cpp.Llama``'s vocabulary, as llama.cpp decides them
    (``llama_vocab_is_eog``: EOS, EOT and the end-of-turn tokens it recognises, e.g. <|eot_id|>, <|end_of_text|>)."""
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return frozenset(t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t))


def token_piece(llm, token: int, special: bool = False) -> bytes:
    """The bytes of one token of a ``llama_cpp.Llama``. ``Llama.detokenize`` uses a fixed 32-byte buffer and returns
    nothing for longer pieces (llama-cpp-python issue 2362); this sizes the buffer from llama.cpp's answer."""
    llama_cpp = _llama_cpp()
    return _piece(llama_cpp, llama_cpp.llama_model_get_vocab(llm.model), token, special)


def _piece(llama_cpp, vocab, token: int, special: bool) -> bytes:
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(token), buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n  # too small: llama.cpp returns minus the size it needs


def _sized_string(call: Callable[[ctypes.Array, int], int]) -> str:
    """A string from a llama.cpp call that returns the length it needs (snprintf-style)."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = call(buf, size)
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


class VocabOnly:
    """A GGUF's vocabulary as llama.cpp loads it (no weights): tokenization, BOS, end-of-generation tokens."""

    def __init__(self, path: str | os.PathLike):
        llama_cpp = _llama_cpp()
        self._lib = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        mark = mark_log()
        self._model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not self._model:
            raise InputError(f"llama.cpp cannot load the vocabulary of {path}: {log_errors_since(mark) or 'unknown error'}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_tokens = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._lib.llama_token * n_max)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata as llama.cpp holds it: scalars as text (arrays are not listed in full)."""
        lib, out = self._lib, {}
        for i in range(lib.llama_model_meta_count(self._model)):
            key = _sized_string(lambda buf, n, i=i: lib.llama_model_meta_key_by_index(self._model, i, buf, n))
            out[key] = _sized_string(lambda buf, n, i=i: lib.llama_model_meta_val_str_by_index(self._model, i, buf, n))
        return out

    def token_texts(self) -> list[str]:
        get = self._lib.llama_vocab_get_text
        return [get(self._vocab, t).decode("utf-8", errors="replace") for t in range(self.n_tokens)]

    def is_control(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_get_attr(self._vocab, token) & self._lib.LLAMA_TOKEN_ATTR_CONTROL)

    def piece(self, token: int, special: bool = True) -> bytes:
        return _piece(self._lib, self._vocab, token, special)

    def close(self) -> None:
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> VocabOnly:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- end of section: chat ---
