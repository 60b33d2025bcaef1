"""Progress when output is not a terminal: plain lines per stage with the time left (cl3.progress.ProgressLines)."""

from __future__ import annotations

from cl3.progress import ProgressLines, duration

from .conftest import run_cl3


def test_lines_come_at_start_periodically_with_the_time_left_and_at_the_end():
    now = [100.0]
    lines: list[str] = []
    p = ProgressLines("sensitivity", lines.append, unit="", clock=lambda: now[0])
    assert lines == ["sensitivity: started"]
    p.update(0, 200)                 # the first update sets the rate's origin (after setup)
    for i in range(1, 200):         # 1 item a second: a line every 10 % (20 s) rather than every 30 s
        now[0] += 1
        p.update(i, 200)
    assert len(lines) == 1 + 9
    assert lines[1] == "sensitivity: 20/200 (10 %), 20 s elapsed, about 3 min 00 s left"
    assert lines[-1].startswith("sensitivity: 180/200 (90 %)") and lines[-1].endswith("about 20 s left")
    now[0] += 1
    p.update(200, 200)
    p.close()
    assert lines[-1] == "sensitivity: done, 200/200 in 3 min 20 s"


def test_slow_stages_get_a_line_every_30_seconds_and_fast_ones_none_in_between():
    now = [0.0]
    lines: list[str] = []
    p = ProgressLines("imatrix", lines.append, clock=lambda: now[0])
    p.update(0, 1000)
    for i in range(1, 10):          # 1 % a chunk, 31 s each: a line per chunk though far below 10 %
        now[0] += 31
        p.update(i, 1000)
    assert len(lines) == 1 + 9 and "about 8 h" in lines[-1]
    fast: list[str] = []
    q = ProgressLines("hashing", fast.append, unit="bytes", clock=lambda: now[0])
    for i in range(101):            # all within one second: no line between start and end
        now[0] += 0.01
        q.update(i * 2**20, 100 * 2**20)
    q.close()
    assert fast == ["hashing: started", "hashing: done, 100 MiB/100 MiB in 1 s"]
    assert duration(3725) == "1 h 02 min"


def test_the_cli_prints_progress_lines_when_stderr_is_not_a_terminal(tiny_llama3_gguf, tmp_path):
    proc = run_cl3("quantize", tiny_llama3_gguf, "Q8_0", "-o", tmp_path / "q8.gguf")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "Q8_0: started" in lines and any(x.startswith("Q8_0: done, ") for x in lines), proc.stderr
    assert "━" not in proc.stderr  # no bar drawn into a log
    quiet = run_cl3("quantize", tiny_llama3_gguf, "Q8_0", "-o", tmp_path / "q8b.gguf", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
