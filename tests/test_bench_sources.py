"""`cl3 bench SRC SRC ...` on one machine: a table per source plus the combined one (the same as with --ray)."""

from __future__ import annotations

import json

from .conftest import one_line_error, run_cl3
from .test_measure import TEXT


def test_several_sources_make_a_table_each_and_a_combined_one(tiny_llama3_gguf, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT, encoding="utf-8")
    srcs = []
    for name in ("A-1.7M-F32", "B-1.7M-F32"):
        srcs.append(tmp_path / f"{name}.gguf")
        srcs[-1].symlink_to(tiny_llama3_gguf)
    proc = run_cl3("bench", *srcs, "-o", tmp_path / "tables", "--type", "Q8_0", "-c", "64", "--chunks", "1", "-f",
                   text, "-p", "16", "-n", "2", "-r", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "tables"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(
        f"{n}{e}" for n in ("A-1.7M-F32", "B-1.7M-F32", "combined") for e in (".csv", ".json", ".md", ".png"))
    combined = json.loads((folder / "combined.json").read_text())
    a = json.loads((folder / "A-1.7M-F32.json").read_text())
    assert combined["types"] == ["A-1.7M-F32:Q8_0", "B-1.7M-F32:Q8_0"]
    assert combined["cells"]["A-1.7M-F32:Q8_0"] == a["cells"]["Q8_0"]
    assert "| | A-1.7M-F32:Q8_0 | B-1.7M-F32:Q8_0 |" in (folder / "combined.md").read_text()


def test_two_sources_of_the_same_name_are_refused(tiny_llama3_gguf, tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "M.gguf").symlink_to(tiny_llama3_gguf)
    proc = run_cl3("bench", tmp_path / "x" / "M.gguf", tmp_path / "y" / "M.gguf", "-o", tmp_path / "t/",
                   "--type", "Q8_0")
    one_line_error(proc, "both write the table M")
    assert not (tmp_path / "t").exists()
