"""`cl3 quantize`: real quantization of tiny real GGUFs through llama.cpp, outputs loaded and evaluated by llama.cpp,
provenance metadata, type names and aliases, the built-in imatrix cache, bad inputs, and byte-parity with llama.cpp's
own llama-quantize when the reference tools are present."""

from __future__ import annotations

import logging
import shutil
import subprocess

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama

from cl3.calibration import calibration_text
from cl3.imatrix import Entry, Imatrix, read_imatrix, write_imatrix

from .conftest import one_line_error, run_cl3

Q = gguf.GGMLQuantizationType
PROMPT = "The quick brown fox 跳过了懒狗 and then"


@pytest.fixture(scope="module")
def imatrix_file(tiny_llama3_gguf, tmp_path_factory):
    directory = tmp_path_factory.mktemp("imatrix")
    calib = directory / "calib.txt"
    calib.write_text(calibration_text()[:20000] + "\n", encoding="utf-8")
    out = directory / "tiny.imatrix.gguf"
    result = run_cl3("imatrix", tiny_llama3_gguf, "--calib", calib, "-c", "128", "--chunks", "4", "-o", out, "-q")
    assert result.returncode == 0, result.stderr
    return out


def logits(path, tokens: list[int]) -> np.ndarray:
    model = Llama(str(path), n_ctx=64, logits_all=True, verbose=False)
    model.eval(tokens)
    values = np.array(model.scores[: len(tokens)], dtype=np.float64)
    model.close()
    return values


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def tensor_types(path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def test_several_types_with_imatrix(tiny_llama3_gguf, imatrix_file, tmp_path):
    result = run_cl3("quantize", tiny_llama3_gguf, "--type", "q8_0,Q4_K", "--type", "q3_k", "--imatrix", imatrix_file,
                     "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    source = fields(tiny_llama3_gguf)
    outputs = sorted(tmp_path.glob("*.gguf"))
    # llama.cpp's naming convention, from the source's general.* metadata, and -im for the imatrix (as the
    # authors' releases name them); Q4_K and Q3_K are aliases of *_M
    expected = {gguf.naming_convention(source.get("general.name"), source.get("general.basename"),
                                       source.get("general.finetune"), source.get("general.version"),
                                       source["general.size_label"], t) + "-im.gguf"
                for t in ("Q8_0", "Q4_K_M", "Q3_K_M")}
    assert {p.name for p in outputs} == expected

    imatrix = gguf.GGUFReader(imatrix_file)
    tokens = Llama(str(tiny_llama3_gguf), vocab_only=True, verbose=False).tokenize(PROMPT.encode())
    reference = logits(tiny_llama3_gguf, tokens)
    expected_ftype = {"-Q8_0-im.gguf": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                      "-Q4_K_M-im.gguf": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
                      "-Q3_K_M-im.gguf": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M}
    for path in outputs:
        suffix = next(s for s in expected_ftype if path.name.endswith(s))
        meta = fields(path)
        assert meta["general.file_type"] == expected_ftype[suffix]
        # provenance, as llama-quantize records it
        assert meta["quantize.imatrix.file"] == str(imatrix_file)
        assert meta["quantize.imatrix.dataset"] == imatrix.get_field("imatrix.datasets").contents()[0]
        assert meta["quantize.imatrix.entries_count"] == len(imatrix.tensors) // 2
        assert meta["quantize.imatrix.chunks_count"] == imatrix.get_field("imatrix.chunk_count").contents()
        # llama.cpp loads and evaluates it, close to the F32 model
        got = logits(path, tokens)
        assert np.all(np.isfinite(got))
        corr = np.corrcoef(got.ravel(), reference.ravel())[0, 1]
        assert corr > (0.999 if suffix == "-Q8_0.gguf" else 0.9), (path.name, corr)
    q8 = next(p for p in outputs if p.name.endswith("-Q8_0-im.gguf"))
    assert {t for n, t in tensor_types(q8).items() if n.startswith("blk.") and n.endswith("_q.weight")} == {Q.Q8_0}


def test_imatrix_changes_the_quantized_weights(tiny_llama3_gguf, imatrix_file, tmp_path):
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    assert run_cl3("quantize", tiny_llama3_gguf, "--type", "Q4_0", "-o", plain, "-q").returncode == 0
    assert run_cl3("quantize", tiny_llama3_gguf, "--type", "Q4_0", "-o", weighted, "--imatrix", imatrix_file,
                   "-q").returncode == 0
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(plain).tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(weighted).tensors}
    assert a.keys() == b.keys()
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"]  # imatrix-weighted rounding
    assert a["blk.0.attn_norm.weight"] == b["blk.0.attn_norm.weight"]  # 1-d tensors are copied
    assert "quantize.imatrix.file" not in fields(plain)


def test_tensor_type_options(tiny_llama3_gguf, tmp_path):
    out = tmp_path / "custom.gguf"
    result = run_cl3("quantize", tiny_llama3_gguf, "--type", "Q4_K_M", "-o", out, "--pure",
                     "--output-tensor-type", "q8_0", "--token-embedding-type", "Q6_K", "-q")
    assert result.returncode == 0, result.stderr
    types = tensor_types(out)
    assert types["token_embd.weight"] == Q.Q6_K
    if "output.weight" in types:
        assert types["output.weight"] == Q.Q8_0
    assert {t for n, t in types.items() if n.startswith("blk.") and n.endswith("weight") and "norm" not in n} \
        == {Q.Q4_K}  # --pure: no Q6_K mixture for attn_v/ffn_down

    kept = tmp_path / "kept.gguf"
    assert run_cl3("quantize", tiny_llama3_gguf, "--type", "Q4_0", "-o", kept, "--leave-output-tensor",
                   "-q").returncode == 0
    if "output.weight" in tensor_types(kept):
        assert tensor_types(kept)["output.weight"] == tensor_types(tiny_llama3_gguf)["output.weight"]


def test_hf_directory_is_converted_on_the_fly(tiny_llama3_dir, tmp_path):
    result = run_cl3("quantize", tiny_llama3_dir, "--type", "Q8_0", "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    outputs = list(tmp_path.iterdir())
    assert len(outputs) == 1 and outputs[0].name.endswith("-Q8_0.gguf")  # the temporary F16 is gone
    assert not [p for p in tiny_llama3_dir.parent.iterdir() if p.name.startswith(".cl3")]
    assert np.all(np.isfinite(logits(outputs[0], [1, 2, 3, 4])))


def test_bare_imatrix_computes_once_and_caches_beside_the_source(tiny_llama3_gguf_f16, tmp_path):
    src = tmp_path / "model-f16.gguf"
    shutil.copy(tiny_llama3_gguf_f16, src)
    first = run_cl3("quantize", src, "--type", "Q2_K", "--imatrix", "--imatrix-chunks", "2", "-q")
    assert first.returncode == 0, first.stderr
    cached = [p for p in tmp_path.iterdir() if p.name.endswith(".imatrix.gguf")]
    assert len(cached) == 1 and cached[0].name.startswith("model-f16.")
    m = read_imatrix(cached[0])
    assert m.chunk_count == 2 and m.chunk_size == 512 and m.datasets[0].startswith("cl3:calibration@")
    output = next(p for p in tmp_path.iterdir() if p.name.endswith("-Q2_K-im.gguf"))
    assert fields(output)["quantize.imatrix.dataset"] == m.datasets[0]

    mtime = cached[0].stat().st_mtime_ns
    second = run_cl3("quantize", src, "--type", "Q2_K_S", "--imatrix", "--imatrix-chunks", "2", "-q")
    assert second.returncode == 0, second.stderr
    assert "reused" in second.stderr and cached[0].stat().st_mtime_ns == mtime


def test_types_needing_an_imatrix_are_refused_before_any_work(tmp_path):
    # the source does not even exist: the type check comes first
    result = run_cl3("quantize", tmp_path / "absent.gguf", "--type", "Q8_0,iq2_xxs")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "IQ2_XXS" in result.stderr and "--imatrix" in result.stderr
    assert list(tmp_path.iterdir()) == []


def _mismatched_names(path):
    write_imatrix(Imatrix({"blk.9.attn_q.weight": Entry(np.ones((1, 256), np.float32), np.array([512]))},
                          ["x.txt"], 1, 512), path)


def _mismatched_sizes(path):
    write_imatrix(Imatrix({"blk.0.attn_q.weight": Entry(np.ones((1, 100), np.float32), np.array([512]))},
                          ["x.txt"], 1, 512), path)


@pytest.mark.parametrize("case", ["corrupt", "truncated", "not-gguf-imatrix", "imatrix-other-names",
                                  "imatrix-other-sizes", "unknown-type", "unknown-tensor-type", "no-output-dir",
                                  "already-quantized", "several-types-one-file", "hf-source-no-output-dir",
                                  "zero-imatrix-chunks"])
def test_bad_inputs_give_one_line_errors_and_leave_nothing(case, tiny_llama3_gguf, tiny_llama3_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    src, args = tiny_llama3_gguf, []
    if case == "corrupt":
        src = inputs / "corrupt.gguf"
        src.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    elif case == "truncated":
        src = inputs / "truncated.gguf"
        src.write_bytes(tiny_llama3_gguf.read_bytes()[:-100_000])
    elif case == "not-gguf-imatrix":
        bad = inputs / "bad.imatrix"
        bad.write_bytes(b"\x01\x00\x00\x00garbage")
        args = ["--imatrix", bad]
    elif case == "imatrix-other-names":
        _mismatched_names(inputs / "other.imatrix.gguf")
        args = ["--imatrix", inputs / "other.imatrix.gguf"]
    elif case == "imatrix-other-sizes":
        _mismatched_sizes(inputs / "other.imatrix.gguf")
        args = ["--imatrix", inputs / "other.imatrix.gguf"]
    elif case == "unknown-tensor-type":
        args = ["--output-tensor-type", "q9_9"]
    elif case == "hf-source-no-output-dir":  # refused before converting the checkpoint
        src = tiny_llama3_dir
    elif case == "zero-imatrix-chunks":
        args = ["--imatrix", "--imatrix-chunks", "0"]
    elif case == "already-quantized":
        src = inputs / "q8.gguf"
        assert run_cl3("quantize", tiny_llama3_gguf, "--type", "Q8_0", "-o", src, "-q").returncode == 0
    types = {"unknown-type": "Q4_K_X", "several-types-one-file": "Q8_0,Q4_0"}.get(case, "Q4_K_M")
    output = {"no-output-dir": tmp_path / "missing" / "x.gguf", "hf-source-no-output-dir": tmp_path / "missing" / "x.gguf",
              "several-types-one-file": out_dir / "x.gguf"}.get(case, out_dir)
    before = sorted(p.name for p in inputs.iterdir())

    result = run_cl3("quantize", src, "--type", types, "-o", output, *args, "-q")
    one_line_error(result)
    assert list(out_dir.iterdir()) == []
    assert sorted(p.name for p in inputs.iterdir()) == before


PARITY_TYPES = ["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


@pytest.mark.parametrize("file_type", PARITY_TYPES)
def test_parity_with_llama_quantize(reference_bin, file_type, tiny_llama3_gguf, imatrix_file, tmp_path):
    """Same source and imatrix file: every tensor of cl3's output is byte-identical to llama-quantize's."""
    ours, theirs = tmp_path / "cl3.gguf", tmp_path / "llama.gguf"
    result = run_cl3("quantize", tiny_llama3_gguf, "--type", file_type, "--imatrix", imatrix_file, "-o", ours, "-q")
    assert result.returncode == 0, result.stderr
    subprocess.run([reference_bin / "llama-quantize", "--imatrix", imatrix_file, tiny_llama3_gguf, theirs,
                    file_type], check=True, capture_output=True)
    a = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(theirs).tensors}
    assert list(a) == list(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, different
    meta_a, meta_b = fields(ours), fields(theirs)
    assert {k: v for k, v in meta_a.items() if k.startswith("quantize.")} == \
        {k: v for k, v in meta_b.items() if k.startswith("quantize.")}


def test_list_types_and_imatrix_name_tag(tiny_llama3_gguf, imatrix_file, tmp_path):
    listing = run_cl3("quantize", "--list-types")
    assert listing.returncode == 0
    rows = {line.split()[0]: line for line in listing.stdout.splitlines() if line.strip()}
    assert {"Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ1_S", "IQ4_XS", "TQ2_0", "BF16"} <= set(rows)
    assert "Q4_K" in rows["Q4_K_M"] and "needs an imatrix" in rows["IQ2_XXS"]

    result = run_cl3("quantize", tiny_llama3_gguf, "Q8_0", "--imatrix", imatrix_file, "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    [output] = tmp_path.iterdir()
    assert output.name.endswith("-Q8_0-im.gguf")


def test_ctrl_c_between_types_names_the_finished_outputs(tmp_path):
    """Ctrl-C while the second of several types is being made: the first (complete) output is kept and named on
    stderr, the unfinished one leaves nothing."""
    import signal
    import sys
    import time

    from cl3.convert import convert
    from cl3.quantize import quantize

    from .tiny import build_llama3_checkpoint

    # big enough that IQ3_S (a grid search per block) takes seconds on one thread
    ckpt = build_llama3_checkpoint(tmp_path / "hf", hidden=512, layers=4, ffn=1536)
    src = convert(ckpt.path, tmp_path / "src-F16.gguf", "f16").path
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cl3", "quantize", src, "Q2_K", "IQ3_S", "Q8_0", "-o", out,
                             "-t", "1", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    deadline = time.monotonic() + 300
    while not list(out.glob("*-Q2_K.gguf")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    [kept] = out.glob("*-Q2_K.gguf")
    assert [p.name for p in out.iterdir()] == [kept.name]   # nothing else, no temporary left
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("interrupted:") and f"kept: {kept}" in lines[0], stderr
    assert "not written: IQ3_S, Q8_0" in lines[0], stderr
    # complete: byte for byte what an uninterrupted run writes
    [whole] = quantize(src, "Q2_K", out=f"{tmp_path / 'whole'}/", threads=1).outputs
    assert kept.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize(("typed", "meant"), [("Q4KM", "Q4_K_M"), ("q4-k-m", "Q4_K_M"), ("iq4xs", "IQ4_XS"),
                                              ("Q5KS", "Q5_K_S"), ("q8", "Q8_0")])
def test_a_mistyped_type_gets_a_did_you_mean(typed, meant, tmp_path):
    line = one_line_error(run_cl3("quantize", tmp_path / "model-F16.gguf", typed), f"did you mean {meant}?")
    assert f"unknown quantization type {typed.upper()!r}" in line


def test_an_unrecognisable_type_lists_the_known_ones(tmp_path):
    line = one_line_error(run_cl3("quantize", tmp_path / "model-F16.gguf", "XYZ"), "unknown quantization type 'XYZ'")
    assert "did you mean" not in line and "Q4_K_M" in line and "IQ2_XXS" in line


def test_a_shorter_builtin_imatrix_spreads_its_chunks_over_every_calibration_file(tiny_llama3_gguf, tmp_path):
    """--imatrix-chunks N: N windows spread over the built-in text's files (languages, kinds), not its first N
    chunks (the first file alone); the imatrix is the one computed on those windows."""
    from importlib import resources

    from cl3 import calibration
    from cl3.imatrix import compute_imatrix, read_imatrix
    from cl3.quantize import Source, builtin_imatrix, spread_calibration

    text = calibration.calibration_text()
    sample = spread_calibration(tiny_llama3_gguf, 5)
    folder = resources.files("cl3") / "data" / "calibration"
    for f in sorted(p for p in folder.iterdir() if p.name.endswith(".txt")):
        paragraphs = [p for p in f.read_text(encoding="utf-8").split("\n\n") if len(p) > 40]
        assert any(p in sample for p in paragraphs), f.name
    path, reused = builtin_imatrix(Source.open(tiny_llama3_gguf), tmp_path, chunks=5)
    got = read_imatrix(path)
    dataset = calibration.builtin_name(calibration.CALIBRATION)
    spread = compute_imatrix(tiny_llama3_gguf, sample, dataset=dataset, chunks=5, parse_special=True).imatrix
    first = compute_imatrix(tiny_llama3_gguf, text, dataset=dataset, chunks=5, parse_special=True).imatrix
    name = "blk.0.ffn_down.weight"
    assert not reused and got.chunk_count == 5
    assert np.allclose(got.entries[name].sums, spread.entries[name].sums, rtol=1e-6)
    assert not np.allclose(got.entries[name].sums, first.entries[name].sums, rtol=1e-3)


def test_a_long_builtin_imatrix_says_how_long_and_how_to_shorten_it(tiny_llama3_gguf, tmp_path, monkeypatch, caplog):
    """Timed on the first chunks: a note with the whole imatrix's time on this machine and a shorter choice (the
    threshold lowered so that the tiny model's imatrix counts as long)."""
    from cl3 import quantize as q

    monkeypatch.setattr(q, "IMATRIX_NOTE_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="cl3"):
        q.builtin_imatrix(q.Source.open(tiny_llama3_gguf), tmp_path)
    notes = [r.getMessage() for r in caplog.records if "the imatrix takes about" in r.getMessage()]
    assert len(notes) == 1 and "on this machine" in notes[0] and "--imatrix-chunks" in notes[0], notes
