"""`cl3 bench`: the table's cells against independent readings of the files it made, resuming, comparing."""

from __future__ import annotations

import csv
import json
import os

import gguf
import pytest

from cl3 import bench, measure

from .conftest import one_line_error, run_cl3
from .test_measure import TEXT

SETTINGS = {"ctx": 64, "chunks": 2, "n_prompt": 32, "n_gen": 4, "repetitions": 1}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def table(tiny_llama3_gguf, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables") / "tiny"
    return bench.bench(tiny_llama3_gguf, types=["F16", "Q8_0", "Q4_0"], out=out, text_file=text_file, kld=True,
                       **SETTINGS), out


def test_cells_match_the_files(table):
    t, _ = table
    for name in ("F16", "Q8_0", "Q4_0"):
        cell = t.cells[name]
        model = cell["model"]
        reader = gguf.GGUFReader(model)
        n_bytes = sum(int(x.n_bytes) for x in reader.tensors)
        n_params = sum(int(x.n_elements) for x in reader.tensors)
        assert cell["size_gib"] == pytest.approx(os.path.getsize(model) / 2**30)
        assert cell["bpw"] == pytest.approx(n_bytes * 8 / n_params)
        assert cell["chunks"] == 2 and cell["scored_tokens"] == 2 * 31
        assert cell["pp_ms_per_token"] > 0 and cell["tg_ms_per_token"] > 0
    # the PPL cell is the perplexity of that file on that text (checked against cl3.measure's own tests)
    again = measure.perplexity(t.cells["Q4_0"]["model"], TEXT, n_ctx=64, chunks=2)
    assert t.cells["Q4_0"]["ppl"] == pytest.approx(again.ppl, rel=1e-6)
    assert t.cells["F16"].get("kld_mean") is None and t.cells["Q4_0"]["kld_mean"] > t.cells["Q8_0"]["kld_mean"] > 0
    assert t.cells["F16"]["bpw"] > t.cells["Q8_0"]["bpw"] > t.cells["Q4_0"]["bpw"]


def test_outputs_are_written_in_the_authors_layout(table):
    t, out = table
    rows = list(csv.reader(out.with_suffix(".csv").read_text().splitlines()))
    assert rows[0] == ["metric", "F16", "Q8_0", "Q4_0"]
    keys = [r[0] for r in rows[1:]]
    assert keys[:3] == ["size_gib", "bpw", "ppl"] and "tg_ms_per_token" in keys and "kld_mean" in keys
    ppl_row = next(r for r in rows if r[0] == "ppl")
    assert float(ppl_row[3]) == pytest.approx(t.cells["Q4_0"]["ppl"], rel=1e-6)
    md = out.with_suffix(".md").read_text()
    assert "| | F16 | Q8_0 | Q4_0 |" in md and "How these numbers were obtained" in md
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["settings"]["ctx"] == 64 and data["machine"]["backend"] and data["method"]["ppl"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_without_recomputing(table, tiny_llama3_gguf, text_file):
    _, out = table
    before = json.loads(out.with_suffix(".json").read_text())["cells"]
    again = bench.bench(tiny_llama3_gguf, types=["F16", "Q8_0", "Q4_0"], out=out, text_file=text_file, kld=True,
                        **SETTINGS)
    assert again.cells == before  # timings would differ had anything been measured again
    # other settings: cells are measured again
    other = bench.bench(tiny_llama3_gguf, types=["Q8_0"], out=out, text_file=text_file,
                        **{**SETTINGS, "chunks": 3})
    assert other.cells["Q8_0"]["chunks"] == 3


def test_compare_with_a_published_table(table, tmp_path):
    t, _ = table
    published = tmp_path / "pub.csv"
    published.write_text("metric,F16,Q8_0,Q4_0\nbpw,16.00,8.50,4.50\nppl,1.0,2.0,\n")
    rows = bench.compare(t, bench.read_table_csv(published))
    bpw = {r["type"]: r for r in rows if r["metric"] == "bpw"}
    assert bpw["Q8_0"]["ratio"] == pytest.approx(t.cells["Q8_0"]["bpw"] / 8.5)
    q4_ppl = next(r for r in rows if r["metric"] == "ppl" and r["type"] == "Q4_0")
    assert q4_ppl["published"] is None and q4_ppl["ratio"] is None


@pytest.mark.parametrize("args, message", [
    (["bench", "missing.gguf", "--types", "Q8_0"], "no such file"),
    (["bench", "{model}", "--types", "Q9_9"], "unknown quantization type"),
    (["bench", "{model}", "--compare", "{bad}"], "not a table CSV"),
    (["bench", "{model}", "-o", "/no/such/dir/table"], "does not exist"),
])
def test_cli_bench_bad_input_is_one_line(args, message, tiny_llama3_gguf, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    proc = run_cl3(*[a.format(model=tiny_llama3_gguf, bad=bad) for a in args], "-o", tmp_path / "t") \
        if "-o" not in args else run_cl3(*[a.format(model=tiny_llama3_gguf, bad=bad) for a in args])
    one_line_error(proc, message)


@pytest.mark.slow  # computes an imatrix on the whole built-in calibration text
def test_imatrix_quantizations_are_kept_apart(tiny_llama3_gguf, text_file, tmp_path):
    out = tmp_path / "imx"
    plain = bench.bench(tiny_llama3_gguf, types=["Q4_K"], out=out, text_file=text_file, **SETTINGS)
    with_imatrix = bench.bench(tiny_llama3_gguf, types=["Q4_K"], out=out, text_file=text_file, imatrix=True,
                               **SETTINGS)
    a, b = plain.cells["Q4_K"]["model"], with_imatrix.cells["Q4_K"]["model"]
    assert a != b and "imatrix-" in b
    reader = gguf.GGUFReader(b)
    assert "quantize.imatrix.file" in reader.fields and "quantize.imatrix.file" not in gguf.GGUFReader(a).fields
    assert with_imatrix.settings.imatrix.startswith("cl3:calibration@")
