"""`cl3 imatrix`: statistics checked against an independent numpy forward pass, llama.cpp's file formats, resume,
bad inputs, and parity with llama.cpp's own llama-imatrix when the reference tools are present."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_cpp import Llama

from cl3.calibration import calibration_text, evaluation_text
from cl3.errors import InputError
from cl3.imatrix import Entry, Imatrix, Interrupted, compute_imatrix, make_imatrix, read_imatrix, write_imatrix
from cl3.scoring import ChunkLayout

from .conftest import one_line_error, run_cl3
from .reference import llama_logits

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def weight_inputs(weights: dict[str, np.ndarray], config: dict, tokens: list[int]) -> dict[str, np.ndarray]:
    """The input rows of every blk.* weight multiplication in a causal Llama pass over ``tokens`` (float64), from
    the independent numpy reference (tests/reference.py), keyed by GGUF weight name."""
    inputs: dict[str, np.ndarray] = {}
    llama_logits(weights, config, tokens, inputs)
    result = {}
    for hf_name, rows in inputs.items():
        layer, module = hf_name.removeprefix("model.layers.").split(".", 1)
        result[f"blk.{layer}.{HF_TO_GGUF[module.removesuffix('.weight')]}.weight"] = rows
    return result


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(calibration_text()[:20000] + "\n", encoding="utf-8")
    return path


def tensor_shapes(path) -> dict[str, list[int]]:
    return {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(path).tensors}


def llama_tokens(model_path, text: str) -> list[int]:
    """Tokenization by llama.cpp's own tokenizer (BOS added, specials not parsed), as llama-imatrix does."""
    vocab = Llama(str(model_path), vocab_only=True, verbose=False)
    return vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def test_imatrix_matches_independent_forward_pass(tiny_llama3, tiny_llama3_gguf, calib_file, tmp_path):
    out = tmp_path / "tiny.imatrix.gguf"
    n_ctx, n_chunks = 64, 3
    result = run_cl3("imatrix", tiny_llama3_gguf, "--calib", calib_file, "-c", n_ctx, "--chunks", n_chunks,
                     "-o", out, "-q")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout

    # the file, read with gguf-py's plain reader (not cl3's)
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents() == [str(calib_file)]
    assert reader.get_field("imatrix.chunk_count").contents() == n_chunks
    assert reader.get_field("imatrix.chunk_size").contents() == n_ctx
    tensors = {t.name: np.array(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    layers = tiny_llama3.config["num_hidden_layers"]
    expected_names = {f"blk.{i}.{n}.weight" for i in range(layers) for n in HF_TO_GGUF.values()}
    assert set(tensors) == {f"{n}{s}" for n in expected_names for s in (".in_sum2", ".counts")}
    assert [t.name for t in reader.tensors] == [f"{n}{s}" for n in sorted(expected_names)
                                                for s in (".in_sum2", ".counts")]

    # the statistics, recomputed: chunks of n_ctx tokens, each starting with BOS, every row counted
    text = calib_file.read_text(encoding="utf-8")[:-1]  # like llama.cpp's -f
    tokens = llama_tokens(tiny_llama3_gguf, text)
    bos = tiny_llama3.config["bos_token_id"]
    sums = {name: 0.0 for name in expected_names}
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        chunk[0] = bos
        for name, rows in weight_inputs(tiny_llama3.weights, tiny_llama3.config, chunk).items():
            sums[name] = sums[name] + (rows * rows).sum(axis=0)
    for name in expected_names:
        assert tensors[f"{name}.counts"].tolist() == [n_chunks * n_ctx]
        np.testing.assert_allclose(tensors[f"{name}.in_sum2"], sums[name], rtol=2e-3, err_msg=name)


def test_gguf_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    original = Imatrix(
        entries={"blk.0.attn_q.weight": Entry(rng.random((1, 8)).astype(np.float32), np.array([1024])),
                 "blk.0.ffn_down_exps.weight": Entry(rng.random((4, 6)).astype(np.float32),
                                                     np.array([100, 0, 7, 3000]))},
        datasets=["a.txt", "b.txt"], chunk_count=2, chunk_size=512)
    path = write_imatrix(original, tmp_path / "x.imatrix.gguf")
    reader = gguf.GGUFReader(path)  # llama.cpp's layout: in_sum2 [ne0, n_mat], counts [1, n_mat], F32
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_down_exps.weight.in_sum2"] == [6, 4]
    assert shapes["blk.0.ffn_down_exps.weight.counts"] == [1, 4]
    assert shapes["blk.0.attn_q.weight.in_sum2"] == [8]  # dense: 1-D, as llama-imatrix (ggml_n_dims drops the 1)
    assert shapes["blk.0.attn_q.weight.counts"] == [1]
    assert reader.get_field("general.architecture") is None

    back = read_imatrix(path)
    assert back.datasets == original.datasets and back.chunk_count == 2 and back.chunk_size == 512
    for name, e in original.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    # llama-quantize's normalisation: sums / count per expert, 1 where an expert saw no data
    imp = back.importances()["blk.0.ffn_down_exps.weight"].reshape(4, 6)
    np.testing.assert_allclose(imp[0], original.entries["blk.0.ffn_down_exps.weight"].sums[0] / 100, rtol=1e-6)
    np.testing.assert_array_equal(imp[1], np.ones(6, np.float32))


def test_reads_dense_entries_stored_2d(tmp_path):
    """Files cl3 wrote before (dense in_sum2 [n, 1], counts [1, 1]) still read the same."""
    sums = np.arange(1, 9, dtype=np.float32)
    writer = gguf.GGUFWriter(tmp_path / "old.imatrix.gguf", arch="")
    writer.add_string(gguf.Keys.General.TYPE, "imatrix")
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", sums.reshape(1, 8))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.array([[64]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert [[int(d) for d in t.shape] for t in gguf.GGUFReader(tmp_path / "old.imatrix.gguf").tensors] == [[8, 1], [1, 1]]
    e = read_imatrix(tmp_path / "old.imatrix.gguf").entries["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(e.sums, sums.reshape(1, 8))
    assert e.counts.tolist() == [64]


def test_reads_legacy_dat(tmp_path):
    """The pre-GGUF format, written here byte by byte after llama.cpp's save_imatrix_legacy."""
    values = {"blk.0.attn_k.weight": np.arange(1, 5, dtype=np.float32), "output.weight": np.full(3, 2.5, np.float32)}
    ncall = 7
    blob = struct.pack("<i", len(values))
    for name, v in values.items():
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, v.size) + v.tobytes()
    blob += struct.pack("<i", 9) + struct.pack("<i", 8) + b"wiki.txt"
    path = tmp_path / "old.dat"
    path.write_bytes(blob)

    m = read_imatrix(path)
    assert m.is_legacy and m.chunk_count == 9 and m.datasets == ["wiki.txt"]
    imp = m.importances()
    np.testing.assert_allclose(imp["blk.0.attn_k.weight"], values["blk.0.attn_k.weight"] / ncall, rtol=1e-6)
    # converting to GGUF keeps the normalised values (raw = value * chunk_size, count = ncall * chunk_size)
    back = read_imatrix(write_imatrix(m, tmp_path / "new.imatrix.gguf"))
    np.testing.assert_allclose(back.importances()["output.weight"], values["output.weight"] / ncall, rtol=1e-6)


def test_resume_continues_where_it_stopped(tiny_llama3_gguf, calib_file, tmp_path):
    whole, part = tmp_path / "whole.imatrix.gguf", tmp_path / "part.imatrix.gguf"
    common = ("--calib", calib_file, "-c", "64", "-q")
    assert run_cl3("imatrix", tiny_llama3_gguf, *common, "--chunks", "4", "-o", whole).returncode == 0
    assert run_cl3("imatrix", tiny_llama3_gguf, *common, "--chunks", "2", "-o", part).returncode == 0
    assert read_imatrix(part).chunk_count == 2
    result = run_cl3("imatrix", tiny_llama3_gguf, *common, "--chunks", "4", "-o", part, "--resume")
    assert result.returncode == 0, result.stderr
    a, b = read_imatrix(whole), read_imatrix(part)
    assert b.chunk_count == 4 and set(a.entries) == set(b.entries)
    for name in a.entries:
        np.testing.assert_array_equal(a.entries[name].counts, b.entries[name].counts)
        np.testing.assert_allclose(a.entries[name].sums, b.entries[name].sums, rtol=1e-5)


def test_builtin_texts_are_bilingual_disjoint_and_long_enough():
    calib, evaluation = calibration_text(), evaluation_text() if _has_evaluation() else ""
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in calib) > 5000  # Chinese
    assert sum(ch.isascii() and ch.isalpha() for ch in calib) > 20000  # English / code
    if evaluation:
        paragraphs = {p.strip() for p in calib.split("\n\n") if len(p.strip()) > 80}
        assert not paragraphs & {p.strip() for p in evaluation.split("\n\n")}


def _has_evaluation() -> bool:
    try:
        evaluation_text()
        return True
    except InputError:
        return False


@pytest.mark.parametrize("case", ["missing", "corrupt", "short-text", "resume-missing", "output-is-model",
                                  "no-output-dir"])
def test_bad_inputs_give_one_line_errors(case, tiny_llama3_gguf, tmp_path):
    out = tmp_path / "o.imatrix.gguf"
    short = tmp_path / "short.txt"
    short.write_text("只有几个字。", encoding="utf-8")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(tiny_llama3_gguf.read_bytes()[:200_000])
    model = tmp_path / "model.gguf"
    model.write_bytes(tiny_llama3_gguf.read_bytes())
    args = {
        "missing": (tmp_path / "nope.gguf", "-o", out),
        "corrupt": (corrupt, "-o", out),
        "short-text": (tiny_llama3_gguf, "--calib", short, "-o", out),
        "resume-missing": (tiny_llama3_gguf, "-o", out, "--resume"),
        "output-is-model": (model, "-o", model),
        "no-output-dir": (tiny_llama3_gguf, "-o", tmp_path / "missing" / "o.imatrix.gguf"),
    }[case]
    result = run_cl3("imatrix", *args, "-q")
    one_line_error(result)
    assert model.read_bytes() == tiny_llama3_gguf.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["short.txt", "corrupt.gguf", "model.gguf"])


def test_parity_with_llama_imatrix(reference_bin, tiny_llama3_gguf, calib_file, tmp_path):
    """Same model, text and settings: the same entries, values within 1e-3 relative."""
    ours, theirs = tmp_path / "cl3.imatrix.gguf", tmp_path / "llama.imatrix.gguf"
    result = run_cl3("imatrix", tiny_llama3_gguf, "--calib", calib_file, "-c", "128", "--chunks", "6", "-o", ours,
                     "-q", "--threads", "2")
    assert result.returncode == 0, result.stderr
    subprocess.run([reference_bin / "llama-imatrix", "-m", tiny_llama3_gguf, "-f", calib_file, "-c", "128",
                    "--chunks", "6", "-o", theirs, "-t", "2", "--no-ppl"], check=True, capture_output=True)
    a, b = read_imatrix(ours), read_imatrix(theirs)
    assert sorted(a.entries) == sorted(b.entries)
    assert (a.chunk_count, a.chunk_size, a.datasets) == (b.chunk_count, b.chunk_size, b.datasets)
    assert tensor_shapes(ours) == tensor_shapes(theirs)  # what gguf-py readers see: 1-D for dense weights
    for name in a.entries:
        np.testing.assert_array_equal(a.entries[name].counts, b.entries[name].counts)
        np.testing.assert_allclose(a.entries[name].sums, b.entries[name].sums, rtol=1e-3, err_msg=name)


def test_ctrl_c_saves_what_was_collected(tiny_llama3_gguf, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(calibration_text() * 3, encoding="utf-8")
    out = tmp_path / "partial.imatrix.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "cl3", "imatrix", tiny_llama3_gguf, "--calib", text, "-c", "64",
                             "-o", out, "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first checkpoint (10 chunks) has been written
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "continue with --resume" in stderr and "Traceback" not in stderr
    partial = read_imatrix(out)
    assert partial.chunk_count >= 10
    assert all(int(e.counts[0]) == partial.chunk_count * 64 for e in partial.entries.values())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# ----------------------------------------------------------------------------------------------------------------------
# Mixture of experts (MUL_MAT_ID): a tiny MoE GGUF made from the dense one (4 experts, 2 used per token)
# ----------------------------------------------------------------------------------------------------------------------

N_EXPERT, N_USED = 4, 2


@pytest.fixture(scope="module")
def tiny_moe_gguf(tiny_llama3_gguf, tmp_path_factory) -> Path:
    """Every FFN becomes N_EXPERT perturbed copies plus a random router, written with gguf-py."""
    reader = gguf.GGUFReader(tiny_llama3_gguf)
    arch = reader.get_field("general.architecture").contents()
    path = tmp_path_factory.mktemp("moe") / "tiny-moe-f32.gguf"
    writer = gguf.GGUFWriter(path, arch)
    for name, f in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub_type)
    writer.add_uint32(f"{arch}.expert_count", N_EXPERT)
    writer.add_uint32(f"{arch}.expert_used_count", N_USED)
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name.endswith(("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")):
            experts = np.stack([data + rng.normal(0, 0.02, data.shape) for _ in range(N_EXPERT)]).astype(np.float32)
            writer.add_tensor(t.name.replace(".weight", "_exps.weight"), experts)
            if t.name.endswith("ffn_gate.weight"):
                router = rng.normal(0, 0.5, (N_EXPERT, data.shape[1])).astype(np.float32)
                writer.add_tensor(t.name.replace("ffn_gate", "ffn_gate_inp"), router)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_experts_are_collected_separately(tiny_moe_gguf, calib_file, tmp_path):
    out = tmp_path / "moe.imatrix.gguf"
    n_ctx, n_chunks = 64, 4
    result = run_cl3("imatrix", tiny_moe_gguf, "--calib", calib_file, "-c", n_ctx, "--chunks", n_chunks, "-o", out,
                     "-q")
    assert result.returncode == 0, result.stderr
    shapes = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(tiny_moe_gguf).tensors}
    m = read_imatrix(out)
    for layer in range(2):
        for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            e = m.entries[f"blk.{layer}.{kind}.weight"]
            assert e.sums.shape == (N_EXPERT, shapes[f"blk.{layer}.{kind}.weight"][0])
            assert int(e.counts.sum()) == n_chunks * n_ctx * N_USED  # every token routed to N_USED experts
        assert m.entries[f"blk.{layer}.ffn_gate_inp.weight"].counts.tolist() == [n_chunks * n_ctx]

    # llama.cpp quantizes the MoE with the per-expert imatrix and the result evaluates
    quantized = tmp_path / "moe-q4_k_m.gguf"
    result = run_cl3("quantize", tiny_moe_gguf, "--type", "Q4_K_M", "--imatrix", out, "-o", quantized, "-q")
    assert result.returncode == 0, result.stderr
    model = Llama(str(quantized), n_ctx=64, logits_all=True, verbose=False)
    model.eval([1, 2, 3, 4, 5])
    assert np.all(np.isfinite(np.array(model.scores[:5])))
    model.close()


def test_moe_parity_with_llama_imatrix(reference_bin, tiny_moe_gguf, calib_file, tmp_path):
    ours, theirs = tmp_path / "cl3.imatrix.gguf", tmp_path / "llama.imatrix.gguf"
    result = run_cl3("imatrix", tiny_moe_gguf, "--calib", calib_file, "-c", "128", "--chunks", "6", "-o", ours, "-q",
                     "--threads", "2")
    assert result.returncode == 0, result.stderr
    subprocess.run([reference_bin / "llama-imatrix", "-m", tiny_moe_gguf, "-f", calib_file, "-c", "128",
                    "--chunks", "6", "-o", theirs, "-t", "2", "--no-ppl"], check=True, capture_output=True)
    a, b = read_imatrix(ours), read_imatrix(theirs)
    assert sorted(a.entries) == sorted(b.entries)
    assert tensor_shapes(ours) == tensor_shapes(theirs)  # experts 2-D, the dense router 1-D
    for name in a.entries:
        np.testing.assert_array_equal(a.entries[name].counts, b.entries[name].counts, err_msg=name)
        np.testing.assert_allclose(a.entries[name].sums, b.entries[name].sums, rtol=1e-3, err_msg=name)

    # and llama-quantize makes the same per-expert quantization from cl3's file as cl3 does
    for file_type in ("Q4_K_M", "Q2_K"):
        mine, native = tmp_path / f"cl3-{file_type}.gguf", tmp_path / f"llama-{file_type}.gguf"
        assert run_cl3("quantize", tiny_moe_gguf, "--type", file_type, "--imatrix", ours, "-o", mine,
                       "-q").returncode == 0
        subprocess.run([reference_bin / "llama-quantize", "--imatrix", ours, tiny_moe_gguf, native, file_type],
                       check=True, capture_output=True)
        x = {t.name: bytes(t.data) for t in gguf.GGUFReader(mine).tensors}
        y = {t.name: bytes(t.data) for t in gguf.GGUFReader(native).tensors}
        assert list(x) == list(y) and [n for n in x if x[n] != y[n]] == []


def test_device_copy_path_reads_the_same_activations(tiny_llama3_gguf):
    """With GPU offload the collector copies activations out with ggml_backend_tensor_get; there is no GPU here,
    so the copy path is forced on host buffers and compared with the in-place view, for every matmul input
    (contiguous and strided) of a real decode."""
    from cl3 import llama

    compared = []

    def on_eval(t, ask):
        if ask:
            return t.op in (llama.GGML_OP_MUL_MAT, llama.GGML_OP_MUL_MAT_ID)
        src1 = llama.tensor_at(t.src[1])
        view = np.array(llama.tensor_array(src1))
        copied = llama.tensor_array(src1, copy=True)
        assert copied.shape == view.shape
        np.testing.assert_array_equal(copied, view)
        compared.append(llama.tensor_name(src1))
        return True

    with llama.Model(tiny_llama3_gguf) as model, llama.Context(model, n_ctx=64, n_batch=64, on_eval=on_eval) as ctx:
        tokens = model.tokenize("模型在本地运行。 The model runs locally.")
        n = len(tokens)
        ctx.decode(tokens, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.ones(n, np.int8))
    assert len(compared) >= 7  # q, k, v, o, gate, up, down of at least one layer


@pytest.fixture(scope="module")
def two_imatrices(tiny_llama3_gguf, calib_file, tmp_path_factory):
    """cl3 imatrices of two different texts (3 and 2 chunks of 64 tokens)."""
    work = tmp_path_factory.mktemp("combine")
    other = work / "eval.txt"
    other.write_text(evaluation_text()[:6000] + "\n", encoding="utf-8")
    a, b = work / "a.imatrix.gguf", work / "b.imatrix.gguf"
    for text, chunks, out in ((calib_file, 3, a), (other, 2, b)):
        result = run_cl3("imatrix", tiny_llama3_gguf, "--calib", text, "-c", 64, "--chunks", chunks, "-o", out, "-q")
        assert result.returncode == 0, result.stderr
    return work, other, a, b


def gguf_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data, dtype=np.float64).reshape(-1) for t in gguf.GGUFReader(path).tensors}


def test_combining_adds_the_statistics(two_imatrices, tiny_llama3_gguf):
    work, other, a, b = two_imatrices
    combined = work / "ab.imatrix.gguf"
    result = run_cl3("imatrix", "--in-file", a, "--in-file", b, "-c", 64, "-o", combined)
    assert result.returncode == 0, result.stderr
    ta, tb, tc = gguf_tensors(a), gguf_tensors(b), gguf_tensors(combined)
    assert set(tc) == set(ta) == set(tb)
    for name in tc:
        np.testing.assert_allclose(tc[name], ta[name] + tb[name], rtol=1e-6, err_msg=name)
    reader = gguf.GGUFReader(combined)
    datasets = reader.get_field("imatrix.datasets").contents()
    assert datasets == gguf.GGUFReader(a).get_field("imatrix.datasets").contents() + [str(other)]
    assert reader.get_field("imatrix.chunk_count").contents() == 5

    # starting from A and evaluating B's text gives the same sums as computing B alone and adding
    started = work / "a-then-b.imatrix.gguf"
    result = run_cl3("imatrix", tiny_llama3_gguf, "--in-file", a, "--calib", other, "-c", 64, "--chunks", 2,
                     "-o", started, "-q")
    assert result.returncode == 0, result.stderr
    ts = gguf_tensors(started)
    for name in tc:
        np.testing.assert_allclose(ts[name], tc[name], rtol=1e-5, err_msg=name)


def test_combining_imatrices_of_different_models_fails_cleanly(two_imatrices, tiny_llama3_gguf, tmp_path):
    _, _, a, _ = two_imatrices
    imatrix = read_imatrix(a)
    name = next(iter(imatrix.entries))
    other = Imatrix({name: Entry(np.ones((1, 7), dtype=np.float32), np.array([64]))}, ["x"], 1, 64)
    wrong = write_imatrix(other, tmp_path / "wrong.imatrix.gguf")
    out = tmp_path / "c.imatrix.gguf"
    result = run_cl3("imatrix", "--in-file", a, "--in-file", wrong, "-o", out)
    one_line_error(result, "error: cannot combine")
    assert not out.exists()
    # starting a model's imatrix from another model's: refused before any evaluation
    result = run_cl3("imatrix", tiny_llama3_gguf, "--in-file", wrong, "-o", out, "-q")
    one_line_error(result, "does not match this model")
    assert not out.exists()


def test_combining_parity_with_llama_imatrix(reference_bin, two_imatrices, tiny_llama3_gguf):
    work, _, a, b = two_imatrices
    ours, theirs = work / "cl3-ab.imatrix.gguf", work / "llama-ab.imatrix.gguf"
    assert run_cl3("imatrix", "--in-file", a, "--in-file", b, "-c", 64, "-o", ours).returncode == 0
    subprocess.run([reference_bin / "llama-imatrix", "-m", tiny_llama3_gguf, "--in-file", a, "--in-file", b,
                    "-c", "64", "-o", theirs], check=True, capture_output=True)
    x, y = read_imatrix(ours), read_imatrix(theirs)
    assert (x.chunk_count, x.chunk_size, x.datasets) == (y.chunk_count, y.chunk_size, y.datasets)
    assert sorted(x.entries) == sorted(y.entries)
    for name in x.entries:
        np.testing.assert_array_equal(x.entries[name].counts, y.entries[name].counts)
        np.testing.assert_allclose(x.entries[name].sums, y.entries[name].sums, rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# Every token of every chunk is counted, so the chunk count read back (and --resume) is exact (issue 20, item 6)
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_ctx", "n_batch", "chunks"), [(256, 2048, 6), (256, 2048, 2), (256, 2048, 9),
                                                          (256, 1536, 7), (1030, 2048, 1)])
def test_counts_cover_every_token_of_every_chunk(tiny_llama3_gguf, n_ctx, n_batch, chunks):
    """Each chunk sends its n_ctx tokens through every blk.* weight once. At llama.cpp's default ubatch of 512,
    6 chunks of 256 side by side split into pieces of 85 tokens per chunk and a last piece of 1 per chunk (6 rows),
    and 1030 tokens into 512 + 512 + 6: pieces under llama-imatrix's 16-row minimum, which went uncounted."""
    result = compute_imatrix(tiny_llama3_gguf, calibration_text(), dataset="cal", n_ctx=n_ctx, n_batch=n_batch,
                             chunks=chunks, parse_special=True)
    assert result.imatrix.chunk_count == chunks
    assert {name: e.counts.tolist() for name, e in result.imatrix.entries.items()} == \
        {name: [chunks * n_ctx] for name in result.imatrix.entries}


def _assert_same_imatrix(a: Imatrix, b: Imatrix) -> None:
    assert (a.chunk_count, a.chunk_size, a.datasets) == (b.chunk_count, b.chunk_size, b.datasets)
    assert sorted(a.entries) == sorted(b.entries)
    for name in a.entries:
        np.testing.assert_array_equal(a.entries[name].counts, b.entries[name].counts, err_msg=name)
        # the resumed run added to sums read back as float32: equal up to that rounding
        np.testing.assert_allclose(a.entries[name].sums, b.entries[name].sums, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize(("chunks", "n_batch"), [(6, 2048), (12, 1536)])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_llama3_gguf, calib_file, tmp_path, chunks, n_batch):
    """Ctrl-C (SIGINT to this process, from the progress callback after the first group of chunks) then
    --resume gives the file an uninterrupted run writes. (6, 2048) is the issue's case: one group of 6 chunks."""
    common = dict(n_ctx=256, chunks=chunks, n_batch=n_batch)
    whole = make_imatrix(tiny_llama3_gguf, [calib_file], out=tmp_path / "whole.imatrix.gguf", **common)
    part = tmp_path / "part.imatrix.gguf"

    def ctrl_c(done, total):
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as stopped:
        make_imatrix(tiny_llama3_gguf, [calib_file], out=part, progress=ctrl_c, **common)
    assert stopped.value.saved_chunks == 6 and read_imatrix(part).chunk_count == 6
    resumed = make_imatrix(tiny_llama3_gguf, [calib_file], out=part, resume=True, **common)
    assert resumed.imatrix.chunk_count == whole.imatrix.chunk_count == chunks
    _assert_same_imatrix(read_imatrix(part), read_imatrix(whole.path))


def test_ctrl_c_twice_then_resume_equals_uninterrupted(tiny_llama3_gguf, tmp_path):
    """The CLI: a child `cl3 imatrix` gets Ctrl-C twice once its first checkpoint (chunk 12) is written."""
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(), encoding="utf-8")  # far more than 36 chunks of 256 tokens
    common = ("-f", text, "-c", "256", "-b", "1536", "--chunks", "36", "-q")
    whole, part = tmp_path / "whole.imatrix.gguf", tmp_path / "part.imatrix.gguf"
    assert run_cl3("imatrix", tiny_llama3_gguf, *common, "-o", whole).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "cl3", "imatrix", tiny_llama3_gguf, *map(str, common), "-o", part],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    deadline = time.monotonic() + 120
    while not part.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr  # not raised inside the eval callback
    saved = read_imatrix(part)
    assert 12 <= saved.chunk_count < 36 and saved.chunk_count % 6 == 0
    result = run_cl3("imatrix", tiny_llama3_gguf, *common, "-o", part, "--resume")
    assert result.returncode == 0, result.stderr
    assert "36 chunks" in result.stdout
    _assert_same_imatrix(read_imatrix(part), read_imatrix(whole))


def test_six_chunks_parity_with_llama_imatrix(reference_bin, tiny_llama3_gguf, tmp_path):
    """-c 256 --chunks 6: cl3 counts all 1536 tokens; so does llama-imatrix at the ubatch size cl3 picks, with the
    same values. (At its default -ub 512 llama-imatrix drops the 6-row pieces: 1530, and its file says 5 chunks.)"""
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(), encoding="utf-8")
    ours = tmp_path / "cl3.imatrix.gguf"
    result = run_cl3("imatrix", tiny_llama3_gguf, "-f", text, "-c", "256", "--chunks", "6", "-o", ours, "-q",
                     "--threads", "2")
    assert result.returncode == 0, result.stderr
    n_ubatch = ChunkLayout.of(256, 2048).ubatch_without_small_pieces(6, 16)
    theirs = {}
    for ub in (n_ubatch, 512):
        theirs[ub] = tmp_path / f"llama-ub{ub}.imatrix.gguf"
        subprocess.run([reference_bin / "llama-imatrix", "-m", tiny_llama3_gguf, "-f", text, "-c", "256",
                        "--chunks", "6", "-ub", str(ub), "-o", theirs[ub], "-t", "2", "--no-ppl"],
                       check=True, capture_output=True)
    a, b = read_imatrix(ours), read_imatrix(theirs[n_ubatch])
    assert a.chunk_count == b.chunk_count == 6
    assert sorted(a.entries) == sorted(b.entries)
    for name in a.entries:
        assert a.entries[name].counts.tolist() == b.entries[name].counts.tolist() == [1536]
        np.testing.assert_allclose(a.entries[name].sums, b.entries[name].sums, rtol=1e-3, err_msg=name)
    default = read_imatrix(theirs[512])
    assert default.chunk_count == 5 and {int(e.counts[0]) for e in default.entries.values()} == {1530}
