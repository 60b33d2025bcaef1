"""`cl3 doctor`: what this installation can do — the llama.cpp build, its CPU features and devices, the AMX check,
where models will run, llama.cpp's own tools if present, and how to reinstall for a GPU."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__, llama
from .llama import hardware

REFERENCE_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
PACKAGE = "llama-cpp-python[server]"


@dataclass
class Report:
    cl3: str
    python: str
    platform: str
    llama_cpp_python: str
    library_dir: str
    cpu_features: list[str]
    amx: dict
    devices: list[dict]
    gpu_offload: bool
    where_models_run: str
    reference_tools: str | None
    reinstall: list[dict] = field(default_factory=list)  # {"for": "CUDA", "command": "..."}

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_features(system_info: str) -> list[str]:
    """The features llama.cpp's system-info line reports as on ("AVX2 = 1" -> "AVX2")."""
    found = []
    for part in system_info.replace("|", "\n").splitlines():
        name, _, value = part.rpartition("=")
        if name.strip() and value.strip() == "1":
            found.append(name.strip().split(":")[-1].strip())
    return found


REFERENCE_BUILD = "bash benchmarks/build-llama-cpp-tools.sh"  # in a clone of cl3


def reference_tools_default_dir() -> Path:
    """Where benchmarks/build-llama-cpp-tools.sh puts llama.cpp's tools for the installed llama-cpp-python."""
    import llama_cpp

    return Path.home() / ".cache" / "cl3-reference" / llama_cpp.__version__ / "build" / "bin"


def reference_tools_dir() -> Path | None:
    """llama.cpp's own tools built from the vendored source ($CL3_REFERENCE_BIN, or the build script's cache);
    `cl3 doctor` and the parity tests both look here."""
    candidates = [os.environ.get("CL3_REFERENCE_BIN"), str(reference_tools_default_dir())]
    for c in candidates:
        if c and all((Path(c) / t).exists() for t in REFERENCE_TOOLS):
            return Path(c)
    return None


def _nvidia_gpu_present() -> bool:
    return bool(shutil.which("nvidia-smi")) or Path("/proc/driver/nvidia").exists()


def reinstall_commands(version: str, has_offload: bool) -> list[dict]:
    """The reinstall line for a GPU build of llama-cpp-python, where this machine has such a GPU and the build
    does not use it (pip compiles llama.cpp; CMAKE_ARGS choose the backend)."""
    if has_offload:
        return []
    line = 'CMAKE_ARGS="{args}" pip install --force-reinstall --no-cache-dir "{pkg}=={version}"'
    commands = []
    if sys.platform == "darwin":
        commands.append({"for": "Metal", "command": line.format(args="-DGGML_METAL=on", pkg=PACKAGE,
                                                                 version=version)})
    elif _nvidia_gpu_present():
        commands.append({"for": "CUDA", "command": line.format(args="-DGGML_CUDA=on", pkg=PACKAGE, version=version)})
    else:
        commands.append({"for": "CUDA (NVIDIA GPUs; needs the CUDA toolkit)",
                         "command": line.format(args="-DGGML_CUDA=on", pkg=PACKAGE, version=version)})
        commands.append({"for": "Vulkan (AMD/Intel GPUs; needs the Vulkan SDK)",
                         "command": line.format(args="-DGGML_VULKAN=on", pkg=PACKAGE, version=version)})
    return commands


def report() -> Report:
    info = llama.backend_info()
    offload = llama.gpu_offload_supported()
    verdict = hardware.amx_verdict()
    tools = reference_tools_dir()
    return Report(
        cl3=__version__, python=platform.python_version(), platform=f"{platform.system()} {platform.machine()}",
        llama_cpp_python=info["llama_cpp_python"], library_dir=str(hardware.library_dir()),
        cpu_features=cpu_features(info["system_info"]),
        amx={"state": verdict.state, "reason": verdict.reason, "built": hardware.amx_kernels_built()},
        devices=info["devices"], gpu_offload=offload, where_models_run=hardware.backend_label(-1),
        reference_tools=str(tools) if tools else None,
        reinstall=reinstall_commands(info["llama_cpp_python"], offload))
