"""What this llama.cpp build can run here: devices, thread counts, and whether its AMX kernels work on this CPU.

llama-cpp-python compiles llama.cpp with ``-march=native``; on a Xeon that advertises AMX this builds the AMX
matmul kernels in, and on some such machines (cloud VMs among them) they die with SIGILL at the first AMX tile
instruction (upstream llama.cpp PR 26954). That the kernel grants the AMX permission says nothing: only running an
AMX matmul tells. So when the build has AMX kernels, cl3 runs one small AMX-eligible matmul through llama.cpp in a
child process, once per llama.cpp build and CPU, and keeps the verdict in its cache. When the child dies, every
model cl3 loads (its own and llama-cpp-python's ``Llama`` objects in chat and serve) is loaded without llama.cpp's
extra CPU buffer types (``use_extra_bufts = false``), which are where the AMX kernels live; the plain CPU kernels
then do the work. ``CL3_AMX=on|off`` overrides the verdict.

Alternatives weighed: a README line with ``CMAKE_ARGS="-DGGML_NATIVE=OFF ..."`` (needs every user to know before
the crash, and costs AVX-512 speed on every other machine), or llama.cpp's CPU-variant builds (``GGML_CPU_ALL_VARIANTS``
needs ``GGML_BACKEND_DL``, which llama-cpp-python's wheel layout does not load). The runtime probe fixes the machine
the user has without a rebuild.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .library import bundled, ggml, ggml_base, library_dir, llama_cpp

log = logging.getLogger("cl3")

AMX_ENV = "CL3_AMX"
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator", 4: "meta"}


def physical_cpu_count() -> int:
    """llama.cpp's default thread count (common_cpu_get_num_physical_cores): one thread per physical core."""
    siblings = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings"):
        try:
            with open(path) as f:
                siblings.add(f.read().strip())
        except OSError:
            pass
    if siblings:
        return len(siblings)
    n = os.cpu_count() or 1
    return max(1, n // 2) if n > 4 else n


# ---------------------------------------------------------------------------------------------------------- devices

@dataclass
class Device:
    name: str           # ggml's name, e.g. "CUDA0", "Metal", "CPU"
    description: str
    type: str           # CPU, GPU, iGPU, accelerator
    memory_free: int     # what can be allocated now (on Linux CPUs: MemAvailable)
    memory_total: int


def devices() -> list[Device]:
    """Every ggml device of this build, with its memory."""
    llama_cpp()
    reg, base = ggml(), ggml_base()
    found = []
    for i in range(reg.ggml_backend_dev_count()):
        dev = reg.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = DEVICE_TYPES.get(base.ggml_backend_dev_type(dev), "?")
        available = available_memory() if kind == "CPU" else None
        found.append(Device(base.ggml_backend_dev_name(dev).decode(), base.ggml_backend_dev_description(dev).decode(),
                            kind, free.value if available is None else available, total.value))
    return found


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """Linux's MemAvailable (what can be allocated without swapping) in bytes; None elsewhere. ggml's CPU device
    reports its total memory as free."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_offload_supported() -> bool:
    """Whether this build can put layers on a GPU (CUDA, Metal, Vulkan, ...)."""
    return bool(llama_cpp().llama_supports_gpu_offload())


def gpu_devices() -> list[Device]:
    return [d for d in devices() if d.type in ("GPU", "iGPU")]


def backend_label(n_gpu_layers: int, n_layer: int | None = None) -> str:
    """Where a model's layers run, in a few words: "CPU", "CUDA0 (all layers)", "Metal (20/32 layers)"."""
    gpus = gpu_devices() if gpu_offload_supported() else []
    if not gpus or n_gpu_layers == 0:
        return "CPU"
    names = "+".join(d.name for d in gpus)
    if n_gpu_layers < 0 or n_layer is None or n_gpu_layers > n_layer:
        return f"{names} (all layers)"
    return f"{names} ({n_gpu_layers}/{n_layer} layers)"


def system_info() -> str:
    return llama_cpp().llama_print_system_info().decode(errors="replace").strip()


def backend_info() -> dict:
    """This build's devices, version and llama.cpp's system-info line (for tables and `cl3 doctor`)."""
    lib = llama_cpp()
    devs = devices()
    gpu = [d.name for d in devs if d.type in ("GPU", "iGPU")] if gpu_offload_supported() else []
    return {
        "backend": ",".join(sorted({n.rstrip("0123456789") for n in gpu})) if gpu else "CPU",
        "devices": [asdict(d) for d in devs],
        "llama_cpp_python": lib.__version__,
        "system_info": system_info(),
        "amx": amx_verdict().state,
    }


# -------------------------------------------------------------------------------------------------------------- AMX

@dataclass
class AmxVerdict:
    state: str        # "not built" | "works" | "crashes" | "forced on" | "forced off"
    reason: str

    @property
    def allows_extra_buffers(self) -> bool:
        return self.state in ("not built", "works", "forced on")


def amx_kernels_built() -> bool:
    """Whether this llama.cpp build has AMX kernels (compiled in by -march=native on an AMX CPU)."""
    lib = bundled("ggml-cpu")
    lib.ggml_cpu_has_amx_int8.restype = ctypes.c_int
    return bool(lib.ggml_cpu_has_amx_int8())


def classify_probe(returncode: int, stderr: str = "") -> AmxVerdict:
    """The verdict from the probe child's exit status."""
    if returncode == 0:
        return AmxVerdict("works", "an AMX matmul through llama.cpp ran in a test process")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return AmxVerdict("crashes", f"an AMX matmul through llama.cpp died with {name} in a test process")
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {returncode}"
    return AmxVerdict("crashes", f"an AMX matmul through llama.cpp failed in a test process ({last})")


def run_probe(command: list[str], timeout: float = 300) -> AmxVerdict:
    """Run a probe child and classify how it ended (a hung child counts as failed)."""
    env = os.environ | {AMX_ENV: "on"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return AmxVerdict("crashes", f"an AMX matmul through llama.cpp did not finish in {timeout:.0f} s")
    return classify_probe(done.returncode, done.stderr)


def _cache_file() -> Path:
    from ..paths import cache_dir

    lib = library_dir() / "libggml-cpu.so.0"
    if not lib.exists():
        lib = next(iter(sorted(library_dir().glob("*ggml-cpu*"))), library_dir())
    st = lib.stat()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    key = hashlib.sha256(f"{lib}|{st.st_size}|{st.st_mtime_ns}|{cpu}".encode()).hexdigest()[:16]
    return cache_dir() / "hardware" / f"amx-{key}.json"


@functools.cache
def amx_verdict() -> AmxVerdict:
    """Whether llama.cpp's AMX kernels may be used here (probed once per build and CPU, then cached)."""
    llama_cpp()
    return decide_amx(amx_kernels_built(), _cache_file(), _probe_this_build)


def decide_amx(built: bool, cache: Path, probe: Callable[[], AmxVerdict]) -> AmxVerdict:
    """The AMX decision: ``CL3_AMX`` first, then no kernels means nothing to fear, then the cached verdict, else
    ``probe()`` — whose verdict is cached, and said once (logger "cl3") when the kernels must be avoided."""
    forced = os.environ.get(AMX_ENV, "").lower()
    if forced in ("on", "1"):
        return AmxVerdict("forced on", f"{AMX_ENV}={forced}")
    if forced in ("off", "0"):
        return AmxVerdict("forced off", f"{AMX_ENV}={forced}")
    if not built:
        return AmxVerdict("not built", "this llama.cpp build has no AMX kernels")
    try:
        data = json.loads(cache.read_text())
        return AmxVerdict(data["state"], data["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    verdict = probe()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(asdict(verdict)))
    except OSError:
        pass
    if not verdict.allows_extra_buffers:
        log.warning("llama.cpp's AMX kernels do not work on this CPU (%s); cl3 loads every model without them "
                    "(plain CPU kernels; `cl3 doctor` shows this, %s=on overrides it)", verdict.reason, AMX_ENV)
    return verdict


def _probe_this_build() -> AmxVerdict:
    with tempfile.TemporaryDirectory(prefix="cl3-amx-probe-") as tmp:
        model = Path(tmp) / "probe.gguf"
        write_probe_model(model)
        return run_probe(probe_command(model))


def probe_command(model: Path) -> list[str]:
    """The child process that loads ``model`` with llama.cpp's extra (AMX) buffers and decodes a batch."""
    return [sys.executable, "-c", "import sys; from cl3.llama.hardware import probe_child; probe_child(sys.argv[1])",
            str(model)]


def extra_buffers_allowed() -> bool:
    """``use_extra_bufts`` for every model cl3 loads."""
    return amx_verdict().allows_extra_buffers


def prepare_llama_objects() -> None:
    """Make llama-cpp-python's ``Llama`` (chat, serve) load models the way :func:`extra_buffers_allowed` says.

    ``Llama`` builds its parameters from ``llama_model_default_params()`` and offers no ``use_extra_bufts``; the
    bindings' default is wrapped once so that it carries cl3's choice.
    """
    lib = llama_cpp()
    if extra_buffers_allowed() or getattr(lib.llama_model_default_params, "_cl3_wrapped", False):
        return
    import llama_cpp.llama_cpp as bindings

    original = bindings.llama_model_default_params

    def without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    without_extra_buffers._cl3_wrapped = True
    bindings.llama_model_default_params = without_extra_buffers
    lib.llama_model_default_params = without_extra_buffers


def write_probe_model(path: Path) -> None:
    """A one-layer Llama GGUF whose matrices are Q8_0 and Q4_0 with AMX-friendly shapes (multiples of 256)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    hidden, ffn, heads = 256, 512, 4
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(253)]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.BYTE] * 253)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def matrix(name: str, rows: int, cols: int, qtype) -> None:
        data = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), hidden)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    matrix("output.weight", len(tokens), hidden, q8)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        matrix(f"blk.0.{name}.weight", hidden, hidden, q8)
    matrix("blk.0.ffn_gate.weight", ffn, hidden, q4)
    matrix("blk.0.ffn_up.weight", ffn, hidden, q4)
    matrix("blk.0.ffn_down.weight", hidden, ffn, q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def probe_child(model_path: str) -> None:
    """In the probe process: load the probe model with the extra (AMX) buffers and decode a batch of 64 tokens."""
    import numpy as np

    from .model import Context, Model

    with Model(model_path, n_gpu_layers=0) as model, Context(model, n_ctx=128, n_batch=64) as ctx:
        n = 64
        tokens = (np.arange(n, dtype=np.int32) % 250) + 3
        ctx.decode(tokens, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.ones(n, np.int8))
        logits = ctx.logits(n)
    if not np.all(np.isfinite(logits)):
        sys.exit("the probe's logits are not finite")
