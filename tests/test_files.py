"""Outputs (cl3/files.py and its callers): what a killed run leaves behind is cleaned up by the next run writing the
same output, never a file another process is still writing (issue 20 item 7); a full disk leaves no empty folder,
and imatrix checks its room before the work and keeps its result when the write fails anyway (item 10)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from cl3 import files, paths
from cl3.errors import OutputError
from cl3.imatrix import imatrix_file_size, make_imatrix, model_weights, read_imatrix

from .conftest import one_line_error, run_cl3


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


# ----------------------------------------------------------------------------------------------------------------------
# A full disk (a real one: a small tmpfs) leaves no empty folder behind, and imatrix checks its room first (item 10)
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a folder on a tmpfs of that size (mounting needs root: skipped otherwise)."""
    mounted = []

    def mount(size: str = "1m") -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, check=False) if os.geteuid() == 0 else None
        if done is None or done.returncode:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=False)  # still busy: detach it all the same


def _fill(folder: Path, leave: int) -> None:
    """Take all but about ``leave`` bytes of the folder's filesystem."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(free - leave, 0))


def test_failed_runs_leave_no_empty_output_folders(tiny_llama3_gguf, small_disk, monkeypatch):
    disk = small_disk("1m")  # the model is 6.8 MB: none of its copies fits
    (disk / "kept").mkdir()  # a folder that was there before stays
    monkeypatch.setenv("CL3_LMSTUDIO_MODELS_DIR", str(disk / "lmstudio"))
    runs = {
        "quantize": ("quantize", tiny_llama3_gguf, "Q8_0", "-o", disk / "q/"),
        "quantize into an existing folder": ("quantize", tiny_llama3_gguf, "Q8_0", "-o", disk / "kept/"),
        "export lmstudio": ("export", "lmstudio", tiny_llama3_gguf),
        "bench": ("bench", tiny_llama3_gguf, "--type", "Q8_0", "-c", "64", "--chunks", "2", "-o", disk / "tables/"),
    }
    for what, args in runs.items():
        result = run_cl3(*args, "-q" if what != "export lmstudio" else "--force")
        assert "no space left" in one_line_error(result), what
        assert sorted(p.name for p in disk.rglob("*")) == ["kept"], what


def test_only_empty_folders_the_failed_block_created_are_removed(tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(OutputError), files.removing_created_folders():
        files.output_directory(tmp_path / "a" / "b/")
        files.make_folder(tmp_path / "there" / "c")
        (files.make_folder(tmp_path / "used") / "file").write_text("kept")
        raise OutputError("no space left on the device")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["there", "used", "used/file"]
    with files.removing_created_folders():  # a run that succeeds keeps its (empty) folder
        files.make_folder(tmp_path / "ok")
    assert (tmp_path / "ok").is_dir()


def test_imatrix_checks_its_room_before_any_work(tiny_llama3_gguf, small_disk):
    disk = small_disk("1m")
    _fill(disk, 8 << 10)  # 8 KiB left; the file alone is about 19 KB
    result = run_cl3("imatrix", tiny_llama3_gguf, "-c", "64", "--chunks", "2", "-o", disk / "im.gguf", "-q")
    line = one_line_error(result, "MB free; the imatrix (and its checkpoints) needs about")
    assert "see -o/--output" in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_imatrix_keeps_its_result_when_the_disk_fills_during_the_run(tiny_llama3_gguf, small_disk, tmp_path):
    disk = small_disk("1m")

    def someone_fills_the_disk(done, total):
        _fill(disk, 0)

    with pytest.raises(OutputError) as failed:
        make_imatrix(tiny_llama3_gguf, out=disk / "im.gguf", n_ctx=64, chunks=2, progress=someone_fills_the_disk)
    message = str(failed.value)
    kept = paths.cache_dir() / "imatrix" / "im.gguf"
    assert "no space left" in message and f"the 2 chunks computed are kept in {kept}" in message
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    expected = make_imatrix(tiny_llama3_gguf, out=tmp_path / "im.gguf", n_ctx=64, chunks=2).imatrix
    got = read_imatrix(kept)
    assert (got.chunk_count, sorted(got.entries)) == (2, sorted(expected.entries))
    for name, e in expected.entries.items():
        np.testing.assert_array_equal(got.entries[name].counts, e.counts)
        np.testing.assert_allclose(got.entries[name].sums.reshape(e.sums.shape), e.sums, rtol=1e-6)


def test_imatrix_size_bound(tiny_llama3_gguf, tmp_path):
    """The room imatrix asks for is an upper bound of the file it writes, and not a wild one."""
    out = make_imatrix(tiny_llama3_gguf, out=tmp_path / "im.gguf", n_ctx=64, chunks=2, process_output=True).path
    bound = imatrix_file_size(model_weights(tiny_llama3_gguf), process_output=True,
                              datasets=read_imatrix(out).datasets)
    assert out.stat().st_size <= bound <= 2 * out.stat().st_size + 8192
