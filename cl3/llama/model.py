"""Where cl3 loads a model and evaluates tokens: one :class:`Model`, and :class:`Context` objects made from it.

Both imatrix collection and perplexity/speed measurement use these two classes; what differs between them is passed
in (``n_seq`` sequences side by side, an eval callback, a threadpool like llama-bench's), not written twice.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable

import numpy as np

from ..errors import InputError, LlamaError
from . import hardware
from .gguf_file import check_gguf_path
from .library import declare, ggml_base, ggml_cpu, libllama, llama_cpp
from .log import log_errors_since, log_listener, mark_log
from .tensors import GgmlTensor, check_ggml_layout

EvalCallback = Callable[[GgmlTensor, bool], bool]
FLASH_ATTN = ("auto", "on", "off")


def model_params(*, n_gpu_layers: int = -1, no_alloc: bool = False, vocab_only: bool = False):
    """``llama_model_params`` as cl3 loads every model.

    Set field by field as llama-cpp-python's ``Llama`` does (the configuration that runs on CUDA builds): layers to
    offload (negative: all), whole layers per GPU, memory-mapped weights; llama.cpp's extra CPU kernels (repacked
    and AMX buffers) unless this CPU's AMX kernels were found to crash (see :mod:`cl3.llama.hardware`).
    """
    lib = llama_cpp()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.split_mode = lib.LLAMA_SPLIT_MODE_LAYER
    params.main_gpu = 0
    params.load_mode = lib.LLAMA_LOAD_MODE_NONE if no_alloc else lib.LLAMA_LOAD_MODE_MMAP
    params.no_alloc = no_alloc
    params.vocab_only = vocab_only
    params.use_extra_bufts = vocab_only or hardware.extra_buffers_allowed()  # no weights: nothing to decide
    return params


class Model:
    """A GGUF model loaded by llama.cpp. ``n_gpu_layers``: layers to offload to a GPU (negative: all; a CPU-only
    build ignores it). ``no_alloc``: read no weight (plan memory on a weight-less GGUF). ``vocab_only``: only the
    vocabulary (tokenize and inspect tokens; no context can be made)."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = -1, no_alloc: bool = False,
                 vocab_only: bool = False):
        lib = llama_cpp()
        self._lib = lib
        self.path = check_gguf_path(path)
        self._ptr = None
        mark = mark_log()
        params = model_params(n_gpu_layers=n_gpu_layers, no_alloc=no_alloc, vocab_only=vocab_only)
        self._ptr = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self._ptr:
            raise InputError(f"llama.cpp cannot load {self.path}: {log_errors_since(mark) or 'not a model it supports'}")
        self.vocab = lib.llama_model_get_vocab(self._ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(lib.llama_vocab_get_add_eos(self.vocab))
        self.bos = lib.llama_vocab_bos(self.vocab)
        self.eos = lib.llama_vocab_eos(self.vocab)
        self.n_params = int(lib.llama_model_n_params(self._ptr))
        self.n_bytes = int(lib.llama_model_size(self._ptr))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._ptr))
        self.n_layer = int(lib.llama_model_n_layer(self._ptr))
        buf = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self._ptr, buf, len(buf))
        self.description = buf.value.decode(errors="replace")
        self.n_gpu_layers = n_gpu_layers
        self.backend = hardware.backend_label(n_gpu_layers, self.n_layer)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """Tokens of ``text`` (llama.cpp's common_tokenize: BOS added when the vocabulary adds one)."""
        data = text.encode("utf-8")
        capacity = len(data) + 2 * int(self.add_bos) + 16
        out = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, parse_special)
        if n < 0:  # the buffer was too small: llama.cpp says how large it must be
            out = (self._lib.llama_token * -n)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), out, -n, add_special, parse_special)
        if n < 0:
            raise LlamaError(f"tokenization failed ({n})")
        return np.ctypeslib.as_array(out)[:n].astype(np.int32)

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token, as llama.cpp decides (EOS, EOT, EOM and the end-of-turn texts it knows)."""
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def is_control(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_get_attr(self.vocab, token) & self._lib.LLAMA_TOKEN_ATTR_CONTROL)

    def piece(self, token: int, *, special: bool = True) -> bytes:
        return token_piece_bytes(self.vocab, token, special)

    def close(self) -> None:
        if self._ptr:
            self._lib.llama_model_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def token_piece_bytes(vocab, token: int, special: bool) -> bytes:
    """A token's bytes through ``llama_token_to_piece``, the buffer sized from its answer (llama-cpp-python's
    ``Llama.detokenize`` has a fixed 32-byte buffer and returns nothing for longer pieces, its issue 2362)."""
    lib = llama_cpp()
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_token_to_piece(vocab, lib.llama_token(token), buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n  # too small: llama.cpp answers minus the size it needs


class Context:
    """A llama_context on ``model``: batches of tokens in, output logits out.

    ``n_seq`` sequences share the ``n_ctx`` cells (llama-perplexity's and llama-imatrix's side-by-side chunks); one
    decode takes at most ``n_batch`` tokens. ``kv_unified``: one cell pool for all sequences, so a sequence copied
    from another (:meth:`seq_copy`, eval's shared few-shot prefix) shares its cells instead of duplicating them. ``on_eval(tensor, ask)`` is the scheduler's eval callback (every graph
    node; the imatrix collector): an exception it raises is re-raised after the decode, and no further node is
    offered to it in that decode. ``threadpool`` attaches a CPU threadpool as llama-bench does.
    """

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_ubatch: int = 512, n_seq: int = 1,
                 threads: int | None = None, flash_attn: str = "auto", on_eval: EvalCallback | None = None,
                 threadpool: bool = False, kv_unified: bool = False):
        lib = llama_cpp()
        self._lib = lib
        self.model = model
        self.threads = threads or hardware.physical_cpu_count()
        self._ptr = self._batch = self._pool = None
        self._callback = None
        self._callback_error: BaseException | None = None
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        params.kv_unified = kv_unified
        params.flash_attn_type = {"auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  "off": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        if on_eval is not None:
            check_ggml_layout()
            self._callback = lib.ggml_backend_sched_eval_callback(self._trampoline(on_eval))
            params.cb_eval = self._callback
            params.cb_eval_user_data = None
        mark = mark_log()
        self._ptr = lib.llama_init_from_model(model._ptr, params)
        if not self._ptr:
            raise LlamaError(f"llama.cpp cannot create a context of {n_ctx} tokens for {model.path}: "
                             f"{log_errors_since(mark) or 'out of memory?'}")
        lib.llama_set_warmup(self._ptr, False)
        self.n_ctx = int(lib.llama_n_ctx(self._ptr))
        self.n_batch = n_batch
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        if threadpool:
            self._pool = _ThreadPool.attach(self._ptr, self.threads)

    def _trampoline(self, on_eval: EvalCallback):
        def trampoline(address: int, ask: bool, user_data) -> bool:
            if self._callback_error is not None:
                return not ask  # collect nothing more; let llama.cpp finish the graph
            try:
                return on_eval(GgmlTensor.from_address(address), ask)
            except BaseException as ex:  # noqa: BLE001 - cannot cross the C boundary; re-raised after the decode
                self._callback_error = ex
                return not ask
        return trampoline

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ptr), True)

    def seq_copy(self, src: int, dst: int) -> None:
        """Sequence ``dst`` continues from everything sequence ``src`` holds (llama_memory_seq_cp, all positions)."""
        self._lib.llama_memory_seq_cp(self._lib.llama_get_memory(self._ptr), src, dst, -1, -1)

    def seq_remove(self, seq: int) -> None:
        """Forget sequence ``seq`` (its cells shared with other sequences stay theirs)."""
        if not self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self._ptr), seq, -1, -1):
            raise LlamaError(f"llama.cpp could not remove sequence {seq}")

    def decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, output: np.ndarray) -> int:
        """Decode one batch (at most n_batch tokens): token i at position ``pos[i]`` of sequence ``seq[i]``, with
        logits when ``output[i]``. Returns how many rows of logits it produced."""
        n = len(tokens)
        if n > self.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch={self.n_batch}")
        b = self._batch
        b.n_tokens = n
        np.ctypeslib.as_array(b.token, shape=(self.n_batch,))[:n] = tokens
        np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))[:n] = pos
        np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:n] = 1
        np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(self.n_batch,))[:n] = output
        for i, s in enumerate(seq.tolist()):
            b.seq_id[i][0] = s
        mark = mark_log()
        ret = self._lib.llama_decode(self._ptr, b)
        if self._callback_error is not None:
            error, self._callback_error = self._callback_error, None
            raise error
        if ret != 0:
            raise LlamaError(f"llama_decode failed ({ret}) on a batch of {n} tokens: "
                             f"{log_errors_since(mark) or 'unknown error'}")
        return int(np.count_nonzero(output))

    def logits(self, n_outputs: int, *, copy: bool = True) -> np.ndarray:
        """The output logits of the last decode, shape (n_outputs, n_vocab), float32. Without ``copy`` the array
        views llama.cpp's buffer and is only valid until the next decode."""
        ptr = self._lib.llama_get_logits(self._ptr)
        view = np.ctypeslib.as_array(ptr, shape=(n_outputs, self.model.n_vocab))
        return view.copy() if copy else view

    def synchronize(self) -> None:
        self._lib.llama_synchronize(self._ptr)

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ptr:
            self._lib.llama_free(self._ptr)
            self._ptr = None
        if self._pool is not None:
            self._pool.free()
            self._pool = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ThreadPool:
    """A ggml CPU threadpool attached to a context, as llama-bench does (poll 50): without it ggml makes a fresh
    pool for every graph, which costs time per generated token."""

    class _Params(ctypes.Structure):
        _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                    ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]

    def __init__(self, pool):
        self._pool = pool

    @classmethod
    def attach(cls, ctx, n_threads: int) -> _ThreadPool | None:
        base, cpu = ggml_base(), ggml_cpu()
        base.ggml_threadpool_params_default.restype = cls._Params
        base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
        cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(cls._Params)]
        cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        params = base.ggml_threadpool_params_default(n_threads)
        params.poll = 50
        pool = cpu.ggml_threadpool_new(ctypes.byref(params))
        if not pool:
            return None
        attach = declare(libllama(), "llama_attach_threadpool", None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
        attach(ctx, pool, None)
        return cls(pool)

    def free(self) -> None:
        ggml_cpu().ggml_threadpool_free(self._pool)


# llama.h has no call for these sizes; llama.cpp logs them when it plans a context.
_KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB")
_COMPUTE_LINE = re.compile(r"(\S+) compute buffer size =\s*([\d.]+) MiB")


def context_memory_plan(model_path: str | os.PathLike, *, n_ctx: int, n_batch: int = 2048, n_ubatch: int = 512,
                        n_gpu_layers: int = 0) -> dict[str, int]:
    """What llama.cpp would allocate for a context of ``n_ctx`` tokens, planned without allocating anything.

    The model is opened with ``no_alloc`` (as llama.cpp's own memory-fitting pass does: no weight is read, so a
    weight-less GGUF works) and the KV-cache and compute-buffer sizes llama.cpp reports are collected.
    Returns {"kv_cache": bytes, "compute": bytes} (reported in MiB with two decimals).
    """
    found = {"kv_cache": None, "compute": 0}

    def on_line(line: str) -> None:
        if m := _KV_LINE.search(line):
            found["kv_cache"] = round(float(m.group(1)) * 2**20)
        elif m := _COMPUTE_LINE.search(line):
            found["compute"] += round(float(m.group(2)) * 2**20)

    with log_listener(on_line), Model(model_path, n_gpu_layers=n_gpu_layers, no_alloc=True) as model, \
            Context(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, threads=1):
        pass
    if found["kv_cache"] is None:
        raise LlamaError("llama.cpp did not report the KV-cache size")
    return found
