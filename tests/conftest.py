"""Shared fixtures: real tiny models built once per test session (real tokenizers, real safetensors, real GGUF)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cl3.convert import convert

from .tiny import build_llama3_checkpoint, build_spm_checkpoint

# Chinese-LLaMA-style vocabulary extension for the SentencePiece fixture (pieces appended after the original ones).
CHINESE_EXTRA_PIECES = ["▁中文", "模型", "量化", "大模型", "▁我们", "天气", "公园", "电脑", "运行", "比特"]


@pytest.fixture(autouse=True, scope="session")
def _isolated_user_dirs(tmp_path_factory):
    """Keep tests away from the real user's data and cache directories; decide the AMX question once, up front
    (on a CPU whose AMX kernels crash, the one-time note would otherwise land in the first command's stderr)."""
    home = tmp_path_factory.getbasetemp() / "user-dirs"
    saved = {k: os.environ.get(k) for k in ("CL3_DATA_DIR", "CL3_CACHE_DIR")}
    os.environ["CL3_DATA_DIR"] = str(home / "data")
    os.environ["CL3_CACHE_DIR"] = str(home / "cache")
    from cl3.llama.hardware import amx_verdict, prepare_llama_objects

    amx_verdict()
    # the tests' own llama_cpp.Llama references load models as cl3 does: without the AMX kernels on a CPU where they crash
    prepare_llama_objects()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory):
    """The Llama-3-Instruct-format checkpoint with its exact weights (TinyCheckpoint)."""
    return build_llama3_checkpoint(tmp_path_factory.mktemp("tiny-llama3") / "hf")


@pytest.fixture(scope="session")
def tiny_llama3_dir(tiny_llama3) -> Path:
    return tiny_llama3.path


@pytest.fixture(scope="session")
def tiny_llama3_gguf(tiny_llama3, tmp_path_factory) -> Path:
    return convert(tiny_llama3.path, tmp_path_factory.mktemp("gguf") / "tiny-llama3-f32.gguf", "f32").path


@pytest.fixture(scope="session")
def tiny_llama3_gguf_f16(tiny_llama3, tmp_path_factory) -> Path:
    return convert(tiny_llama3.path, tmp_path_factory.mktemp("gguf") / "tiny-llama3-f16.gguf", "f16").path


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory):
    return build_spm_checkpoint(tmp_path_factory.mktemp("tiny-spm") / "hf", extra_pieces=CHINESE_EXTRA_PIECES)


@pytest.fixture(scope="session")
def tiny_spm_dir(tiny_spm) -> Path:
    return tiny_spm.path


@pytest.fixture(scope="session")
def tiny_spm_gguf(tiny_spm, tmp_path_factory) -> Path:
    return convert(tiny_spm.path, tmp_path_factory.mktemp("gguf") / "tiny-spm-f32.gguf", "f32").path


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """``trained_demo(seed)``: the demo model built with that seed as (F16 GGUF, imatrix GGUF on the first 48 chunks
    of the built-in calibration text), built once per session. Seed 1 is the shipped demo model."""
    from cl3.calibration import builtin_name, calibration_text
    from cl3.demo_model import build_demo_checkpoint
    from cl3.imatrix import compute_imatrix, write_imatrix

    built: dict[int, tuple[Path, Path]] = {}

    def get(seed: int) -> tuple[Path, Path]:
        if seed not in built:
            root = tmp_path_factory.mktemp(f"demo-seed{seed}")
            ckpt = build_demo_checkpoint(root / "hf", seed=seed)
            f16 = convert(ckpt.path, root / f"demo{seed}-F16.gguf", "f16").path
            imatrix = compute_imatrix(f16, calibration_text(), dataset=builtin_name("calibration"), chunks=48,
                                      parse_special=True).imatrix
            built[seed] = (f16, write_imatrix(imatrix, root / f"demo{seed}.imatrix.gguf"))
        return built[seed]

    return get


@pytest.fixture(scope="session")
def reference_bin() -> Path:
    """llama.cpp's own tools, found as `cl3 doctor` finds them ($CL3_REFERENCE_BIN, else where
    benchmarks/build-llama-cpp-tools.sh builds them); skip when absent."""
    from cl3.doctor import REFERENCE_BUILD, reference_tools_dir

    path = reference_tools_dir()
    if path is None:
        pytest.skip(f"llama.cpp reference tools not available (build them: {REFERENCE_BUILD}; or set "
                    "CL3_REFERENCE_BIN to their bin directory)")
    return path


def run_cl3(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `cl3` command line in a subprocess (exit code, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "cl3", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=os.environ | {"COLUMNS": "200"})


def stop_process(proc: subprocess.Popen) -> None:
    """End a server the test started: SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_line_error(proc: subprocess.CompletedProcess, message: str = "") -> str:
    """The single ``error:`` line a failed cl3 run printed (no traceback, no blank line from an empty progress
    bar, a non-zero exit other than 70, the code of an internal error); checks ``message`` is in it."""
    assert proc.returncode not in (0, 70), proc.stderr
    lines = proc.stderr.rstrip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], repr(proc.stderr)
    return lines[0]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """test_measure's evaluation text as a file (bench's text_file)."""
    from .test_measure import TEXT

    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path
