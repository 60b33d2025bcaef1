"""`cl3 bench`: the table's cells against independent readings of the files it made, resuming, comparing."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import gguf
import pytest

from cl3 import bench, measure

from .conftest import one_line_error, run_cl3
from .test_measure import TEXT

SETTINGS = {"ctx": 64, "chunks": 2, "n_prompt": 32, "n_gen": 4, "repetitions": 1}


@pytest.fixture(scope="module")
def table(tiny_llama3_gguf, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables") / "Tiny-1.7M-F32"  # dots in the name, as llama.cpp's file names have
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


def written(out, extension):
    return out.with_name(out.name + extension)


def test_outputs_are_written_in_the_authors_layout(table):
    t, out = table
    assert sorted(p.name for p in out.parent.iterdir() if p.is_file()) == [
        "Tiny-1.7M-F32.csv", "Tiny-1.7M-F32.json", "Tiny-1.7M-F32.md", "Tiny-1.7M-F32.png"]
    rows = list(csv.reader(written(out, ".csv").read_text().splitlines()))
    assert rows[0] == ["metric", "F16", "Q8_0", "Q4_0"]
    keys = [r[0] for r in rows[1:]]
    assert keys[:4] == ["size_mib", "bpw", "ppl", "ppl_stderr"]
    assert "tg_ms_per_token" in keys and keys[keys.index("kld_mean") + 1] == "kld_stderr"
    ppl_row = next(r for r in rows if r[0] == "ppl")
    assert float(ppl_row[3]) == pytest.approx(t.cells["Q4_0"]["ppl"], rel=1e-6)
    md = written(out, ".md").read_text()
    assert "| | F16 | Q8_0 | Q4_0 |" in md and "How these numbers were obtained" in md
    data = json.loads(written(out, ".json").read_text())
    assert data["settings"]["ctx"] == 64 and data["machine"]["backend"] and data["method"]["ppl"]
    assert written(out, ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _markdown_rows(md: str) -> dict[str, list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| |")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


def test_ppl_is_shown_with_its_standard_error(table):
    """Markdown and Rich show `PPL ± stderr`, the CSV a separate ppl_stderr row; the error is llama-perplexity's
    estimate for that file and text, recomputed here."""
    t, out = table
    again = measure.perplexity(t.cells["Q8_0"]["model"], TEXT, n_ctx=64, chunks=2)
    assert t.cells["Q8_0"]["ppl_stderr"] == pytest.approx(again.stderr, rel=1e-6) and again.stderr > 0
    md = _markdown_rows(written(out, ".md").read_text())
    csv_rows = {r[0]: r[1:] for r in csv.reader(written(out, ".csv").read_text().splitlines())}
    for i, name in enumerate(t.types):
        ppl, err = t.cells[name]["ppl"], t.cells[name]["ppl_stderr"]
        assert md["PPL"][i] == f"{ppl:.3f} ± {err:.3f}"
        assert float(csv_rows["ppl_stderr"][i]) == pytest.approx(err, rel=1e-5)
    assert md["KLD vs F16"][0] == "" and " ± " in md["KLD vs F16"][2]
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(bench.render_rich(t))
    shown = console.export_text()
    lines = shown.splitlines()  # the error sits under its value, in the same column
    for n in t.types:
        value, err = f"{t.cells[n]['ppl']:.3f}", f"± {t.cells[n]['ppl_stderr']:.3f}"
        row = next(i for i, line in enumerate(lines) if value in line)
        assert err in lines[row + 1] and lines[row + 1].index(err) + len(err) == lines[row].index(value) + len(value)


def test_csv_and_markdown_sizes_share_their_unit(table):
    t, out = table
    md = _markdown_rows(written(out, ".md").read_text())
    csv_rows = {r[0]: r[1:] for r in csv.reader(written(out, ".csv").read_text().splitlines())}
    assert "Size (GiB)" not in md and "size_gib" not in csv_rows  # a model under 1 GiB: MiB in both
    for i, name in enumerate(t.types):
        mib = os.path.getsize(t.cells[name]["model"]) / 2**20
        assert float(csv_rows["size_mib"][i]) == pytest.approx(mib, rel=1e-5)
        assert md["Size (MiB)"][i] == f"{mib:.1f}"
    big = bench.BenchTable("big", "x", ["F16"], bench.BenchSettings(),
                           cells={"F16": {"size_gib": 1.5, "size_bytes": 3 * 2**29, "ppl": 5.13, "ppl_stderr": 0.021}})
    assert "size_gib,1.5" in bench.render_csv(big) and "size_mib" not in bench.render_csv(big)
    assert "| Size (GiB) | 1.50 |" in bench.render_markdown(big) and "| PPL | 5.130 ± 0.021 |" in bench.render_markdown(big)


def test_plot_has_ppl_error_bars(table):
    from matplotlib.container import ErrorbarContainer

    t, _ = table
    fig = bench.figure(t)
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and bars[0].has_yerr
    segments = bars[0].lines[2][0].get_segments()
    for name, seg in zip(t.types, segments):
        (x0, low), (x1, high) = seg
        assert x0 == x1 == pytest.approx(os.path.getsize(t.cells[name]["model"]) / 2**20)
        assert (low, high) == pytest.approx((t.cells[name]["ppl"] - t.cells[name]["ppl_stderr"],
                                             t.cells[name]["ppl"] + t.cells[name]["ppl_stderr"]))


def test_rerun_resumes_without_recomputing(table, tiny_llama3_gguf, text_file):
    _, out = table
    before = json.loads(written(out, ".json").read_text())["cells"]
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
    (["bench", "missing.gguf", "--types", "Q8_0"], "no such GGUF file or model folder"),
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


def test_cli_default_table_name_is_the_whole_file_name(tiny_llama3_gguf, text_file, tmp_path, monkeypatch):
    """M2-7.3M-F16.gguf and M2-7.9M-F16.gguf get tables of their own (not both `M2-7`)."""
    monkeypatch.chdir(tmp_path)
    for name in ("M2-7.3M-F16", "M2-7.9M-F16"):
        model = tmp_path / f"{name}.gguf"
        model.symlink_to(tiny_llama3_gguf)
        proc = run_cl3("bench", model, "--types", "Q8_0", "-c", "64", "--chunks", "1", "-f", text_file, "-p", "32",
                       "-n", "4", "-r", "1", "-q")
        assert proc.returncode == 0, proc.stderr
        files = [f"quant_tables/{name}{ext}" for ext in (".md", ".csv", ".json", ".png")]
        assert all((tmp_path / f).is_file() for f in files)
        assert ("wrote " + ", ".join(files)) in " ".join(proc.stdout.split())
    tables = sorted(p.name for p in (tmp_path / "quant_tables").iterdir() if p.is_file())
    assert len(tables) == 8 and not any(n.startswith("M2-7.") and n.count(".") == 1 for n in tables)
    assert json.loads((tmp_path / "quant_tables" / "M2-7.9M-F16.json").read_text())["source"].endswith("M2-7.9M-F16.gguf")


@pytest.mark.slow  # computes an imatrix on the whole built-in calibration text
def test_imatrix_quantizations_are_kept_apart(tiny_llama3_gguf, text_file, tmp_path):
    out = tmp_path / "imx"
    plain = bench.bench(tiny_llama3_gguf, types=["Q4_K"], out=out, text_file=text_file, **SETTINGS)
    with_imatrix = bench.bench(tiny_llama3_gguf, types=["Q4_K"], out=out, text_file=text_file, imatrix=True,
                               **SETTINGS)
    a, b = plain.cells["Q4_K_M"]["model"], with_imatrix.cells["Q4_K_M"]["model"]  # llama.cpp's name
    assert a != b and "imatrix-" in b
    reader = gguf.GGUFReader(b)
    assert "quantize.imatrix.file" in reader.fields and "quantize.imatrix.file" not in gguf.GGUFReader(a).fields
    assert with_imatrix.settings.imatrix.startswith("cl3:calibration@")


@pytest.mark.slow
def test_imatrix_both_and_mix_columns(trained_demo, tmp_path):
    """--imatrix both: each type's better file (lower KLD) kept and marked, both variants' values recorded and true;
    --mix: cl3's mixes at the kept files' sizes, no larger, lower KLD; the plot has them as a curve."""
    f16, imatrix = trained_demo(1)
    t = bench.bench(f16, types=["Q2_K", "Q4_K_M"], out=tmp_path / "demo", imatrix=imatrix, imatrix_both=True,
                    mix=["Q2_K", "q4_k"], mix_measure="anchors", kld=True, ctx=512, chunks=4, n_prompt=32, n_gen=4,
                    repetitions=1, threads=2)
    assert t.types == ["Q2_K", "Q4_K_M", "mix@Q2_K", "mix@Q4_K_M"]
    for name in ("Q2_K", "Q4_K_M"):
        cell = t.cells[name]
        v = cell["variants"]
        assert "quantize.imatrix.file" in gguf.GGUFReader(v["imatrix"]["model"]).fields
        assert "quantize.imatrix.file" not in gguf.GGUFReader(v["plain"]["model"]).fields
        kept = "imatrix" if v["imatrix"]["kld_mean"] < v["plain"]["kld_mean"] else "plain"
        assert cell["imatrix"] == ("yes" if kept == "imatrix" else "no") and cell["model"] == v[kept]["model"]
        assert (cell["kld_imatrix"], cell["kld_plain"]) == (v["imatrix"]["kld_mean"], v["plain"]["kld_mean"])
        again = measure.perplexity(v["plain"]["model"], None, n_ctx=512, chunks=4, kld_base=f16)
        assert cell["ppl_plain"] == pytest.approx(again.ppl, rel=1e-6)
        mixed = t.cells[f"mix@{name}"]
        assert mixed["size_bytes"] <= cell["size_bytes"]
        assert mixed["kld_mean"] < cell["kld_mean"]
        assert mixed["pp_ms_per_token"] > 0
    csv_rows = {r[0]: r[1:] for r in csv.reader((tmp_path / "demo.csv").read_text().splitlines())}
    assert csv_rows["imatrix"][:2] == [t.cells["Q2_K"]["imatrix"], t.cells["Q4_K_M"]["imatrix"]]
    fig = bench.figure(t)
    kld_axis = fig.axes[1]
    curves = [line for line in kld_axis.get_lines() if len(line.get_xdata()) == 2 and line.get_linestyle() == "-"]
    assert len(curves) == 1 and list(curves[0].get_ydata()) == [t.cells["mix@Q2_K"]["kld_mean"],
                                                               t.cells["mix@Q4_K_M"]["kld_mean"]]
    assert (tmp_path / "demo.png").is_file()


def test_mix_and_both_settings_are_checked_first(tiny_llama3_gguf, tmp_path):
    with pytest.raises(bench.UsageError):
        bench.bench(tiny_llama3_gguf, types=["Q8_0"], out=tmp_path / "t", imatrix_both=True)
    with pytest.raises(bench.UsageError):
        bench.bench(tiny_llama3_gguf, types=["Q8_0"], out=tmp_path / "t", mix=["Q9_9"])
    with pytest.raises(bench.UsageError):
        bench.bench(tiny_llama3_gguf, types=["Q8_0"], out=tmp_path / "t", mix=["Q8_0"], mix_measure="guess")
    assert not list(tmp_path.iterdir())


def test_columns_carry_llama_cpps_names_and_match_the_authors_table(tiny_llama3_gguf, text_file, tmp_path):
    """Columns are llama.cpp's names whatever alias was asked (Q4_K -> Q4_K_M); a table saved with the alias resumes,
    and --compare matches the published table's columns (the authors' Q4_K is Q4_K_M) in either spelling."""
    out = tmp_path / "names"
    t = bench.bench(tiny_llama3_gguf, types=["q8_0", "Q4_K"], out=out, text_file=text_file, **SETTINGS)
    assert t.types == ["Q8_0", "Q4_K_M"]
    assert bench.AUTHORS_TYPES == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
    assert written(out, ".csv").read_text().splitlines()[0] == "metric,Q8_0,Q4_K_M"
    saved = json.loads(written(out, ".json").read_text())
    saved["types"] = ["Q8_0", "Q4_K"]
    saved["cells"]["Q4_K"] = saved["cells"].pop("Q4_K_M")  # as tables were saved before
    written(out, ".json").write_text(json.dumps(saved))
    again = bench.bench(tiny_llama3_gguf, types=["Q8_0", "Q4_K_M"], out=out, text_file=text_file, **SETTINGS)
    assert again.cells["Q4_K_M"] == saved["cells"]["Q4_K"]  # reused, not measured again
    repo_table = Path(__file__).parent.parent / "quant_tables" / "llama-3-chinese-8b.published.csv"
    authors = tmp_path / "authors.csv"
    authors.write_text("metric,Q8_0,Q4_K\nbpw,8.50,4.89\n")
    for published in (repo_table, authors):
        bpw = {r["type"]: r["published"] for r in bench.compare(t, bench.read_table_csv(published))
               if r["metric"] == "bpw"}
        assert bpw == {"Q8_0": 8.50, "Q4_K_M": 4.89}, published
