"""The hardware layer: the AMX decision (with real child processes), the fallback reaching llama.cpp for cl3's own
models and llama-cpp-python's Llama objects, one GPU-layers option everywhere, and `cl3 doctor`."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from cl3.llama import hardware
from cl3.quantize import quantize

from .conftest import run_cl3


@pytest.fixture(scope="module")
def tiny_q4_0(tiny_llama3_gguf_f16, tmp_path_factory):
    """Q4_0 weights: llama.cpp repacks them into its extra CPU buffers (CPU_REPACK) where the CPU allows."""
    return quantize(tiny_llama3_gguf_f16, "Q4_0", out=tmp_path_factory.mktemp("q4") / "tiny-q4_0.gguf").outputs[0]


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# ------------------------------------------------------------------------------------------------- the decision

def test_probe_children_are_classified_by_how_they_end():
    works = hardware.run_probe(child("pass"))
    assert works.state == "works" and works.allows_extra_buffers
    sigill = hardware.run_probe(child("import os, signal; os.kill(os.getpid(), signal.SIGILL)"))
    assert sigill.state == "crashes" and "SIGILL" in sigill.reason and not sigill.allows_extra_buffers
    failed = hardware.run_probe(child("raise SystemExit('tile config refused')"))
    assert failed.state == "crashes" and "tile config refused" in failed.reason
    hung = hardware.run_probe(child("import time; time.sleep(30)"), timeout=1)
    assert hung.state == "crashes" and "did not finish" in hung.reason


def test_a_crashing_probe_is_cached_and_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(hardware.AMX_ENV, raising=False)
    cache = tmp_path / "amx.json"
    runs = []

    def probe():
        runs.append(1)
        return hardware.run_probe(child("import os, signal; os.kill(os.getpid(), signal.SIGILL)"))

    with caplog.at_level(logging.WARNING, logger="cl3"):
        first = hardware.decide_amx(True, cache, probe)
        second = hardware.decide_amx(True, cache, probe)
    assert first == second and first.state == "crashes" and len(runs) == 1
    notes = [r.getMessage() for r in caplog.records if r.name == "cl3"]
    assert len(notes) == 1 and "AMX kernels do not work" in notes[0] and "SIGILL" in notes[0]
    assert json.loads(cache.read_text())["state"] == "crashes"


def test_no_probe_without_amx_kernels_and_the_override_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(hardware.AMX_ENV, raising=False)
    never = lambda: pytest.fail("probed a build without AMX kernels")  # noqa: E731
    assert hardware.decide_amx(False, tmp_path / "c.json", never).state == "not built"
    monkeypatch.setenv(hardware.AMX_ENV, "off")
    assert not hardware.decide_amx(True, tmp_path / "c.json", never).allows_extra_buffers
    monkeypatch.setenv(hardware.AMX_ENV, "on")
    assert hardware.decide_amx(True, tmp_path / "c.json", never).allows_extra_buffers


def test_this_machines_verdict_matches_its_build():
    """Whatever the CPU: a build without AMX kernels is never probed; one with them gets a probed verdict."""
    verdict = hardware.amx_verdict()
    if os.environ.get(hardware.AMX_ENV):
        assert verdict.state.startswith("forced")
    elif hardware.amx_kernels_built():
        assert verdict.state in ("works", "crashes")
    else:
        assert verdict.state == "not built"


def test_the_probe_model_decodes_through_llama_cpp(tmp_path):
    """The probe child itself: a real llama.cpp decode of the AMX-shaped probe model. With the extra buffers off it
    must run on every CPU; this is what the verdict rests on."""
    model = tmp_path / "probe.gguf"
    hardware.write_probe_model(model)
    env_off = {hardware.AMX_ENV: "off"}
    import subprocess

    done = subprocess.run(hardware.probe_command(model), capture_output=True, text=True, timeout=120,
                          env=os.environ | env_off)
    assert done.returncode == 0, done.stderr
    if not hardware.amx_kernels_built():  # here the AMX path does not exist, so with the buffers on it runs too
        assert hardware.run_probe(hardware.probe_command(model)).state == "works"


# --------------------------------------------------------------------------------- the fallback reaches llama.cpp

def _buffers(log: str) -> set[str]:
    return set(re.findall(r"(\w+) model buffer size", log))


LLAMA_OBJECTS = """
import sys
from cl3.chat import ChatModel
from cl3.llama.log import log_lines_since
from cl3.serve import create_app, server_settings

ChatModel(sys.argv[1], n_ctx=256).close()
create_app(server_settings(sys.argv[1], port=int(sys.argv[2]), n_ctx=256))
print("\\n".join(log_lines_since(0)))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("amx", ["off", "on"])
def test_fallback_reaches_every_model_load(amx, tiny_q4_0):
    """CL3_AMX=off (what a crashing probe decides) reaches llama.cpp for cl3's own models (speed) and for
    llama-cpp-python's Llama objects (chat and serve): no repacked/AMX buffer is made; with "on" they are."""
    import subprocess

    if amx == "on" and hardware.amx_kernels_built() and not hardware.amx_verdict().allows_extra_buffers:
        pytest.skip("this CPU's AMX kernels crash (cl3's probe said so): forcing them on would only reproduce that")
    env = os.environ | {hardware.AMX_ENV: amx, "CL3_LLAMA_LOG": "1"}
    speed = subprocess.run([sys.executable, "-m", "cl3", "speed", str(tiny_q4_0), "-p", "16", "-n", "2", "-r", "1",
                            "-q"], capture_output=True, text=True, timeout=300, env=env)
    objects = subprocess.run([sys.executable, "-c", LLAMA_OBJECTS, str(tiny_q4_0), str(_free_port())],
                             capture_output=True, text=True, timeout=300, env=env)
    assert speed.returncode == 0 and objects.returncode == 0, speed.stderr[-800:] + objects.stderr[-800:]
    loads = [_buffers(speed.stderr), _buffers(objects.stdout)]
    assert all("CPU_Mapped" in b for b in loads), loads
    if amx == "off":
        assert all(not (b - {"CPU_Mapped", "CPU"}) for b in loads), loads
    elif "REPACK = 1" in hardware.system_info():
        assert all("CPU_REPACK" in b for b in loads), loads


# ------------------------------------------------------------------------------------ one GPU story, `cl3 doctor`

COMMANDS = ["imatrix", "quantize", "ppl", "speed", "bench", "demo", "chat", "serve"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_spells_threads_and_gpu_layers_the_same(command):
    proc = run_cl3(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"--n-gpu-layers\s+-ngl\s+N\s+Layers to offload to the GPU: -1 all, 0 none", proc.stdout), command
    assert re.search(r"--threads\s+-t\s+N\s+CPU threads", proc.stdout), command
    assert "[default: -1]" in proc.stdout.split("--n-gpu-layers")[1].split("\n--")[0].replace("│", "")
    assert not re.search(r"<(int|str|path|bool|float|list\[)", proc.stdout), command  # no Python type names


@pytest.mark.parametrize("command", ["imatrix", "ppl", "bench", "chat", "serve"])
def test_every_command_spells_the_context_size_the_same(command):
    assert re.search(r"--ctx-size\s+-c\s+N", run_cl3(command, "--help").stdout), command


def test_old_spellings_still_work(tiny_llama3_gguf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("模型在本地运行。The model runs locally on a desktop computer. " * 40, encoding="utf-8")
    new = run_cl3("ppl", tiny_llama3_gguf, "--file", text, "--ctx-size", "64", "--chunks", "2", "--json")
    old = run_cl3("ppl", tiny_llama3_gguf, "--text", text, "--ctx", "64", "--chunks", "2", "--gpu-layers", "0",
                  "--json")
    assert new.returncode == 0 and old.returncode == 0, new.stderr + old.stderr
    assert json.loads(new.stdout)["ppl"] == json.loads(old.stdout)["ppl"]


def test_usage_errors_are_one_line():
    for args in (["ppl", "--bogus"], ["speed", "m.gguf", "-t", "many"], ["nope"]):
        proc = run_cl3(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "--help" in lines[0], proc.stderr


def test_doctor_reports_what_this_build_can_do():
    proc = run_cl3("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    import llama_cpp

    assert report["llama_cpp_python"] == llama_cpp.__version__
    assert report["amx"]["state"] == hardware.amx_verdict().state
    assert report["gpu_offload"] == bool(llama_cpp.llama_supports_gpu_offload())
    assert any(d["type"] == "CPU" for d in report["devices"])
    assert ("AVX2" in report["cpu_features"]) == ("AVX2 = 1" in llama_cpp.llama_print_system_info().decode())
    if not report["gpu_offload"]:
        assert report["where_models_run"] == "CPU"
        assert all("CMAKE_ARGS=" in r["command"] and "llama-cpp-python[server]==" in r["command"]
                   for r in report["reinstall"]) and report["reinstall"]
    screen = run_cl3("doctor")
    assert screen.returncode == 0 and "AMX kernels" in screen.stdout and "models run on" in screen.stdout


def _fake_reference_tools(bin_dir):
    from cl3.doctor import REFERENCE_TOOLS

    bin_dir.mkdir(parents=True)
    for tool in REFERENCE_TOOLS:
        (bin_dir / tool).write_text("#!/bin/sh\n")
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def test_parity_tests_find_the_reference_tools_where_doctor_does(tmp_path):
    """README's plain `pytest` runs the parity tests when llama.cpp's tools were built in the build script's cache
    (~/.cache/cl3-reference/VERSION/build/bin), without CL3_REFERENCE_BIN; the variable still wins when set."""
    import llama_cpp

    home = tmp_path / "home"
    default = _fake_reference_tools(home / ".cache" / "cl3-reference" / llama_cpp.__version__ / "build" / "bin")
    elsewhere = _fake_reference_tools(tmp_path / "elsewhere" / "bin")
    probe = tmp_path / "probe" / "test_probe.py"
    probe.parent.mkdir()
    probe.write_text("import os\n\ndef test_probe(reference_bin):\n"
                     "    assert str(reference_bin) == os.environ['EXPECTED_BIN']\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "CL3_REFERENCE_BIN"} | {
        "HOME": str(home), "PYTHONPATH": root, "COLUMNS": "200"}
    for extra, expected in (({}, default), ({"CL3_REFERENCE_BIN": str(elsewhere)}, elsewhere)):
        run_env = env | extra | {"EXPECTED_BIN": str(expected)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                               "--rootdir", str(probe.parent), str(probe)], capture_output=True, text=True,
                              env=run_env, cwd=probe.parent, timeout=300)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
        doctor = subprocess.run([sys.executable, "-m", "cl3", "doctor", "--json"], capture_output=True, text=True,
                                env=run_env, timeout=300)
        assert json.loads(doctor.stdout)["reference_tools"] == str(expected), doctor.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MemAvailable is Linux's")
def test_doctor_reports_available_memory_not_the_total():
    """The CPU's free memory is Linux's MemAvailable (psutil's independent reading), not ggml's total-as-free."""
    import psutil

    before = psutil.virtual_memory().available
    proc = run_cl3("doctor", "--json")
    after = psutil.virtual_memory().available
    assert proc.returncode == 0, proc.stderr
    [cpu] = [d for d in json.loads(proc.stdout)["devices"] if d["type"] == "CPU"]
    slack = 256 << 20
    assert min(before, after) - slack <= cpu["memory_free"] <= max(before, after) + slack, cpu
    assert cpu["memory_total"] > 0
    assert "GiB available" in run_cl3("doctor").stdout
