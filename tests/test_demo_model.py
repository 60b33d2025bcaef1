"""The demo model really predicts text, through llama.cpp, and quantizing it degrades it in the expected order."""

from __future__ import annotations

import ctypes
import json

import llama_cpp
import numpy as np
import pytest

from cl3.calibration import calibration_text, evaluation_text
from cl3.convert import convert
from cl3.demo_model import DEMO_VOCAB, build_demo_checkpoint

N_CTX = 512
N_CHUNKS = 8  # of the evaluation text's ~59 chunks: enough to order the types, fast enough for the suite
QUANT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


def perplexity(model_path, text: str, n_ctx: int = N_CTX, max_chunks: int = N_CHUNKS) -> tuple[float, np.ndarray]:
    """llama-perplexity's method: BOS-first non-overlapping chunks of n_ctx tokens, second half of each scored.
    Returns the perplexity and the log-probabilities at the scored positions (for KL divergences)."""
    llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    first = n_ctx // 2
    nll, all_log_probs = [], []
    for k in range(min(max_chunks, len(tokens) // n_ctx)):
        chunk = list(tokens[k * n_ctx:(k + 1) * n_ctx])
        chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll.append(-log_probs[np.arange(len(logits)), chunk[first + 1:]])
        all_log_probs.append(log_probs.astype(np.float32))
    return float(np.exp(np.concatenate(nll).mean())), np.concatenate(all_log_probs)


def quantize_with_llama_cpp(src, dst, type_name: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "hf")


@pytest.fixture(scope="module")
def demo_f16(demo, tmp_path_factory):
    return convert(demo.path, tmp_path_factory.mktemp("demo-gguf") / "demo-F16.gguf", "f16").path


@pytest.fixture(scope="module")
def measured(demo_f16) -> dict[str, tuple[float, float]]:
    """{type: (perplexity, mean KL divergence from F16)} on the first N_CHUNKS chunks of the evaluation text."""
    text = evaluation_text()
    ppl, base = perplexity(demo_f16, text)
    result = {"F16": (ppl, 0.0)}
    for name in QUANT_TYPES:
        dst = demo_f16.with_name(f"demo-{name}.gguf")
        quantize_with_llama_cpp(demo_f16, dst, name)
        ppl, log_probs = perplexity(dst, text)
        result[name] = (ppl, float((np.exp(base) * (base - log_probs)).sum(axis=1).mean()))
    print("\nPPL, KLD on the evaluation text:", json.dumps({k: [round(v[0], 2), round(v[1], 4)] for k, v in
                                                             result.items()}))
    return result


@pytest.fixture(scope="module")
def ppl_by_type(measured) -> dict[str, float]:
    return {name: ppl for name, (ppl, _) in measured.items()}


def test_demo_checkpoint_shape(demo, demo_f16):
    cfg = demo.config
    assert cfg["vocab_size"] == DEMO_VOCAB == len(json.loads((demo.path / "tokenizer.json").read_text())["model"][
        "vocab"]) + 16
    # every matrix row length is a multiple of 256, so llama.cpp's K-quants apply to every tensor
    for name, w in demo.weights.items():
        if w.ndim == 2:
            assert w.shape[1] % 256 == 0, name
    assert demo_f16.stat().st_size < 40e6


def test_f16_perplexity_far_below_uniform(ppl_by_type):
    assert ppl_by_type["F16"] < DEMO_VOCAB / 5


def test_quantization_order(ppl_by_type, measured):
    values = [ppl_by_type[t] for t in QUANT_TYPES]
    assert values == sorted(values), ppl_by_type
    # F16 vs Q8_0: +0.2% on the whole evaluation text, within the sampling noise of a few chunks (as for real
    # models); the KL divergence from F16, which has no such noise, orders all types strictly.
    assert ppl_by_type["Q8_0"] > 0.999 * ppl_by_type["F16"], ppl_by_type
    kld = [measured[t][1] for t in QUANT_TYPES]
    assert 0 < kld[0] and kld == sorted(kld), measured
    assert ppl_by_type["Q2_K"] > 1.3 * ppl_by_type["F16"]
    assert ppl_by_type["Q3_K_M"] > 1.05 * ppl_by_type["F16"]


def test_imatrix_lowers_the_perplexity_gap_at_low_bits(demo_f16, ppl_by_type, tmp_path):
    """An importance matrix from the built-in calibration text (cl3 imatrix) brings Q2_K and Q3_K_M closer to F16
    than plain quantization, measured on the held-out evaluation text by this file's own perplexity code."""
    from cl3.imatrix import read_imatrix
    from cl3.quantize import quantize

    from .conftest import run_cl3

    imatrix = tmp_path / "demo.imatrix.gguf"
    result = run_cl3("imatrix", demo_f16, "-o", imatrix, "-q")
    assert result.returncode == 0, result.stderr
    assert read_imatrix(imatrix).chunk_count >= 60
    text, chunks = evaluation_text(), 2 * N_CHUNKS
    f16 = perplexity(demo_f16, text, max_chunks=chunks)[0]
    gaps = {}
    for name in ("Q3_K_M", "Q2_K"):
        plain, weighted = tmp_path / f"{name}.gguf", tmp_path / f"{name}-im.gguf"
        quantize_with_llama_cpp(demo_f16, plain, name)
        quantize(demo_f16, name, out=weighted, imatrix=imatrix)
        gaps[name] = [perplexity(path, text, max_chunks=chunks)[0] - f16 for path in (plain, weighted)]
    print("\nPPL gap to F16 (plain, imatrix):", gaps)
    for name, (plain, weighted) in gaps.items():
        assert 0 < weighted < 0.97 * plain, (name, gaps)


def _mlp_forward(weights: dict[str, np.ndarray], tokens: np.ndarray, use_mlp: bool = True):
    """The checkpoint's forward pass in numpy without attention (which the demo keeps nearly silent).
    Returns logits and each layer's MLP activations (the inputs of down_proj)."""
    def rms_norm(x, w):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-5) * w

    h = weights["model.embed_tokens.weight"][tokens]
    activations = []
    layer = 0
    while f"model.layers.{layer}.mlp.gate_proj.weight" in weights:
        p = f"model.layers.{layer}."
        x = rms_norm(h, weights[p + "post_attention_layernorm.weight"])
        gate, up = x @ weights[p + "mlp.gate_proj.weight"].T, x @ weights[p + "mlp.up_proj.weight"].T
        act = gate / (1 + np.exp(-gate)) * up
        activations.append(act)
        if use_mlp:
            h = h + act @ weights[p + "mlp.down_proj.weight"].T
        layer += 1
    return rms_norm(h, weights["model.norm.weight"]) @ weights["lm_head.weight"].T, activations


def test_llama_cpp_logits_match_numpy_reference(demo, demo_f16):
    """llama.cpp's logits on the F16 GGUF agree with an independent numpy forward pass over the checkpoint."""
    llm = llama_cpp.Llama(str(demo_f16), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
    tokens = llm.tokenize("The keeper climbed the tower. 灯塔的光。".encode(), add_bos=True, special=False)
    llm.eval(tokens)
    got = np.asarray(llm.scores[:len(tokens)])
    want, _ = _mlp_forward(demo.weights, np.array(tokens))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() > 0.9


def test_layers_carry_the_information(demo):
    """Without the MLPs the logits are flat: the knowledge is in the transformer layers, not in embed/output alone."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo.path / "tokenizer.json"))
    ids = np.array(tok.encode(evaluation_text()[:4000]).ids)

    def ppl(use_mlp):
        logits, _ = _mlp_forward(demo.weights, ids[:-1], use_mlp)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))

    assert ppl(True) < DEMO_VOCAB / 5
    assert ppl(False) > 0.9 * DEMO_VOCAB


def test_activations_are_non_uniform_across_columns(demo):
    """One thing an importance matrix sees: the energy of down_proj's inputs (one column per token) follows the
    token frequencies of real text, so a few columns dominate. (The other, the outlier channels of the RMSNorm
    weights, is what makes imatrix quantization win; see test_imatrix_lowers_the_perplexity_gap_at_low_bits.)"""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo.path / "tokenizer.json"))
    ids = np.array(tok.encode(calibration_text()[:8000]).ids)
    _, activations = _mlp_forward(demo.weights, ids)
    for act in activations:
        energy = np.sort((act * act).sum(axis=0))[::-1]  # llama-imatrix's statistic: sum of squared inputs per column
        top_share = energy[: len(energy) // 10].sum() / energy.sum()
        print(f"\ndown_proj input energy: top 10% of columns hold {top_share:.0%}")
        assert top_share > 0.5


def test_the_demos_files_share_one_name(demo, tmp_path):
    """The demo's F16 and the quantized files made from it carry the same llama.cpp-style name."""
    from cl3.demo import f16_path
    from cl3.quantize import Source, resolve_types

    f16 = f16_path(tmp_path, demo.path)
    convert(demo.path, f16, "f16")
    [q4] = resolve_types(["Q4_K"])
    quantized = Source.open(f16).output_name(q4)
    assert f16.name.removesuffix("-F16.gguf") + "-Q4_K_M.gguf" == quantized
    assert quantized.startswith("Cl3-Demo-Llama3-")
