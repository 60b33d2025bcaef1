"""Outputs (cl3/files.py and its callers): what a killed run leaves behind is cleaned up by the next run writing the
same output, never a file another process is still writing (issue 20 item 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf

from cl3 import files

from .conftest import run_cl3


def _partials(folder: Path, name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".partial"))


def _killed_mid_write(args: list, folder: Path, name: str) -> Path:
    """Run `cl3 ARGS` and SIGKILL it as soon as its temporary output appears; the partial it leaves."""
    for _ in range(5):  # the write is short: if the run finished first, try again
        for p in folder.iterdir():
            p.unlink()
        proc = subprocess.Popen([sys.executable, "-m", "cl3", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if _partials(folder, name):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL and _partials(folder, name):
            return _partials(folder, name)[0]
    raise AssertionError("the run always finished before its temporary output could be seen")


def _partial_name(name: str, host: str, pid: int, start: int) -> str:
    return f".{name}.{host}-{pid}-{start}.abc123_x.partial"


def test_a_killed_runs_partial_is_removed_by_the_next_run(tiny_llama3_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "tiny.gguf"
    convert = ["convert", tiny_llama3_dir, "--outtype", "f32", "-o", target]
    stale = _killed_mid_write(convert, out, target.name)
    assert not target.exists() and stale.stat().st_size > 0

    sleeper = subprocess.Popen(["sleep", "120"])  # a live writer of another partial of the same output
    try:
        host, start = files._host(), files._start_time(sleeper.pid)
        live = out / _partial_name(target.name, host, sleeper.pid, start)
        reused_pid = out / _partial_name(target.name, host, sleeper.pid, start - 1)  # same PID, another process
        other_host = out / _partial_name(target.name, "0" * 8 if host != "0" * 8 else "1" * 8, 999_999, 5)
        other_output = out / _partial_name("other.gguf", host, 999_999, 5)
        for p in (live, reused_pid, other_host, other_output):
            p.write_bytes(b"partial")

        result = run_cl3(*convert, "--force")
        assert result.returncode == 0, result.stderr
        notes = [line for line in result.stderr.splitlines() if "earlier run that was killed" in line]
        assert len(notes) == 1 and notes[0].startswith("note: removed 2 unfinished files"), result.stderr
        assert not stale.exists() and not reused_pid.exists()
        assert live.exists() and other_host.exists() and other_output.exists()
        assert gguf.GGUFReader(target).tensors  # the new output is complete
    finally:
        sleeper.kill()
        sleeper.wait()

    # once its writer is gone, the next run removes that one too, and says which file it was
    result = run_cl3(*convert, "--force")
    assert result.returncode == 0, result.stderr
    assert f"note: removed {live.name} (7 bytes) left in {out}" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([target.name, other_host.name, other_output.name])


def test_a_partial_of_this_process_is_kept(tmp_path):
    """The writer's own temporary (a second output of the same name written at the same time) is never stale."""
    target = tmp_path / "x.bin"
    with files.atomic_output(target) as first:
        first.write_bytes(b"1")
        assert files.stale_partials(target) == []
        with files.atomic_output(target) as second:
            second.write_bytes(b"2")
            assert first.exists()
    assert target.read_bytes() == b"1" and _partials(tmp_path, target.name) == []


def test_partial_names_carry_the_writer(tmp_path):
    target = tmp_path / "model.gguf"
    with files.atomic_output(target) as tmp:
        assert tmp.name.startswith(f".model.gguf.{files._host()}-{os.getpid()}-{files._start_time(os.getpid())}.")
        tmp.write_bytes(b"x")
