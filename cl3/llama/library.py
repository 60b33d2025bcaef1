"""llama.cpp, loaded once: llama-cpp-python's bindings, the backend, and the ggml libraries bundled with them."""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import threading

from ..errors import LlamaError

_init_lock = threading.Lock()
_initialized = False


def llama_cpp():
    """llama-cpp-python's low-level module, with cl3's log capture installed and the backend initialised (once).

    Importing llama_cpp loads the shared libraries, so it happens here, on first use, not at cl3's import.
    """
    global _initialized
    import llama_cpp as module

    with _init_lock:
        if not _initialized:
            from . import log

            log.install(module)
            module.llama_backend_init()
            _initialized = True
    return module


@functools.cache
def library_dir() -> pathlib.Path:
    """The folder of the libllama llama-cpp-python loaded (its lib/, or $LLAMA_CPP_LIB_PATH)."""
    import llama_cpp.llama_cpp as bindings

    return pathlib.Path(bindings._lib._name).resolve().parent


def libllama() -> ctypes.CDLL:
    """The very libllama llama-cpp-python loaded (for the few functions its bindings do not wrap)."""
    llama_cpp()
    import llama_cpp.llama_cpp as bindings

    return bindings._lib


@functools.cache
def bundled(stem: str) -> ctypes.CDLL:
    """The ggml library ``stem`` (e.g. ``ggml-base``) that libllama itself linked against.

    Wheels hold copies, not symlinks: ``libggml-base.so`` would be a second, separate ggml with its own state, so the
    versioned name libllama's DT_NEEDED uses comes first.
    """
    llama_cpp()
    folder = library_dir()
    names = [f"lib{stem}.so.0", f"lib{stem}.0.dylib", f"{stem}.dll", f"lib{stem}.so", f"lib{stem}.dylib"]
    path = next((folder / n for n in names if (folder / n).exists()), None)
    if path is None:
        raise LlamaError(f"lib{stem} not found in {folder}")
    return ctypes.CDLL(os.fspath(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))


def declare(lib: ctypes.CDLL, name: str, restype, *argtypes):
    """Give a C function its signature (once) and return it."""
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """libggml-base with the signatures cl3 uses declared."""
    lib = bundled("ggml-base")
    c = ctypes
    declare(lib, "ggml_nbytes", c.c_size_t, c.c_void_p)
    declare(lib, "ggml_nrows", c.c_int64, c.c_void_p)
    declare(lib, "ggml_op_name", c.c_char_p, c.c_int)
    declare(lib, "ggml_type_name", c.c_char_p, c.c_int)
    declare(lib, "ggml_row_size", c.c_size_t, c.c_int, c.c_int64)
    declare(lib, "ggml_tensor_overhead", c.c_size_t)
    declare(lib, "ggml_backend_buffer_is_host", c.c_bool, c.c_void_p)
    declare(lib, "ggml_backend_tensor_get", None, c.c_void_p, c.c_void_p, c.c_size_t, c.c_size_t)
    declare(lib, "ggml_backend_dev_name", c.c_char_p, c.c_void_p)
    declare(lib, "ggml_backend_dev_description", c.c_char_p, c.c_void_p)
    declare(lib, "ggml_backend_dev_type", c.c_int, c.c_void_p)
    declare(lib, "ggml_backend_dev_memory", None, c.c_void_p, c.POINTER(c.c_size_t), c.POINTER(c.c_size_t))
    declare(lib, "ggml_backend_dev_backend_reg", c.c_void_p, c.c_void_p)
    declare(lib, "ggml_backend_reg_get_proc_address", c.c_void_p, c.c_void_p, c.c_char_p)
    declare(lib, "ggml_backend_buft_name", c.c_char_p, c.c_void_p)
    return lib


@functools.cache
def ggml() -> ctypes.CDLL:
    """libggml (the backend registry: devices)."""
    lib = bundled("ggml")
    declare(lib, "ggml_backend_dev_count", ctypes.c_size_t)
    declare(lib, "ggml_backend_dev_get", ctypes.c_void_p, ctypes.c_size_t)
    return lib


@functools.cache
def ggml_cpu() -> ctypes.CDLL:
    """libggml-cpu (threadpools)."""
    return bundled("ggml-cpu")
