"""cl3.measure against independent references: a numpy forward pass, direct float64 formulas, llama-perplexity."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from cl3 import llama, measure
from cl3.llama import hardware
from cl3.quantize import quantize

from .conftest import one_line_error, run_cl3
from .reference import llama_logits

TEXT = ("The quick brown fox jumps over the lazy dog near the river bank. 今天天气很好，我们去公园散步吧。"
        "Large language models are quantized to run on desktop computers; 量化模型可以在普通电脑上运行。") * 12


def reference_perplexity(ckpt, tokens: list[int], n_ctx: int, n_chunk: int, bos: int) -> float:
    """llama-perplexity's recipe written out directly: BOS first in each chunk, score the second half, float64."""
    nll = []
    for c in range(n_chunk):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        chunk[0] = bos
        logits = llama_logits(ckpt.weights, ckpt.config, chunk)
        for p in range(n_ctx // 2, n_ctx - 1):
            row = logits[p] - logits[p].max()
            nll.append(np.log(np.exp(row).sum()) - row[tokens[c * n_ctx + p + 1]])
    return math.exp(float(np.mean(nll)))


@pytest.fixture(scope="session")
def tiny_q4_0(tiny_llama3_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-Q4_0.gguf"
    quantize(tiny_llama3_gguf, ["Q4_0"], out=out)
    return out


def hf_tokens(ckpt, text: str) -> list[int]:
    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    return [ckpt.config["bos_token_id"]] + tok.encode(text, add_special_tokens=False).ids


def test_perplexity_matches_a_numpy_forward_pass(tiny_llama3, tiny_llama3_gguf):
    n_ctx, n_chunk = 64, 3
    tokens = hf_tokens(tiny_llama3, TEXT)
    expected = reference_perplexity(tiny_llama3, tokens, n_ctx, n_chunk, tiny_llama3.config["bos_token_id"])
    result = measure.perplexity(tiny_llama3_gguf, TEXT, n_ctx=n_ctx, chunks=n_chunk)
    assert result.text_tokens == len(tokens)  # llama.cpp tokenizes like the HF tokenizer, with one BOS
    assert result.chunks == n_chunk and result.tokens == n_chunk * (n_ctx - 1 - n_ctx // 2)
    assert result.ppl == pytest.approx(expected, rel=1e-4)
    assert 0 < result.stderr < result.ppl


def test_batching_does_not_change_the_result(tiny_llama3_gguf):
    # 4 chunks decoded side by side (n_batch = 4 * n_ctx), one chunk per decode, and each chunk split in 4 decodes
    side_by_side = measure.perplexity(tiny_llama3_gguf, TEXT, n_ctx=64, n_batch=256, chunks=4)
    one_by_one = measure.perplexity(tiny_llama3_gguf, TEXT, n_ctx=64, n_batch=64, chunks=4)
    split = measure.perplexity(tiny_llama3_gguf, TEXT, n_ctx=64, n_batch=16, chunks=4)
    # same tokens, same scoring; only floating-point summation order differs
    assert side_by_side.ppl == pytest.approx(one_by_one.ppl, rel=1e-4)
    assert split.ppl == pytest.approx(one_by_one.ppl, rel=1e-4)
    assert split.stderr == pytest.approx(one_by_one.stderr, rel=1e-3)
    assert side_by_side.tokens == one_by_one.tokens == split.tokens == 4 * 31


def test_standard_error_is_the_delta_method_of_the_nll_spread(tiny_llama3, tiny_llama3_gguf):
    n_ctx, n_chunk = 64, 2
    tokens = hf_tokens(tiny_llama3, TEXT)
    nll = []
    for c in range(n_chunk):
        chunk = [tiny_llama3.config["bos_token_id"]] + tokens[c * n_ctx + 1:(c + 1) * n_ctx]
        logits = llama_logits(tiny_llama3.weights, tiny_llama3.config, chunk)
        for p in range(n_ctx // 2, n_ctx - 1):
            row = logits[p] - logits[p].max()
            nll.append(np.log(np.exp(row).sum()) - row[tokens[c * n_ctx + p + 1]])
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    expected = ppl * nll.std(ddof=0) / math.sqrt(len(nll) - 1)
    result = measure.perplexity(tiny_llama3_gguf, TEXT, n_ctx=n_ctx, chunks=n_chunk)
    assert result.stderr == pytest.approx(expected, rel=1e-3)


def test_base_logits_file_is_llama_cpp_format(tiny_llama3_gguf, tmp_path):
    path = tmp_path / "base.logits"
    result = measure.save_base_logits(tiny_llama3_gguf, path, TEXT, n_ctx=64, chunks=2)
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", raw[8:20])
    assert (n_ctx, n_chunk) == (64, 2)
    assert len(raw) == measure.base_logits_size(n_vocab, n_ctx, n_chunk)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(raw, dtype="<u2", offset=20 + 4 * n_ctx * n_chunk).reshape(-1, nv)
    assert rows.shape[0] == n_chunk * (n_ctx - 1 - n_ctx // 2)
    scale_min = rows[:, :4].copy().view("<f4")
    log_p = scale_min[:, :1] * rows[:, 4:4 + n_vocab] + scale_min[:, 1:2]
    mass = np.where(rows[:, 4:4 + n_vocab] > 0, np.exp(log_p), 0).sum(axis=1)
    assert np.all(mass > 0.95) and np.all(mass < 1.001)   # the stored distributions are distributions
    assert result.ppl > 1


def test_kld_matches_direct_float64_computation(tiny_llama3_gguf, tiny_q4_0, tmp_path):
    n_ctx, chunks = 64, 3
    result = measure.perplexity(tiny_q4_0, TEXT, n_ctx=n_ctx, chunks=chunks, kld_base=tiny_llama3_gguf)
    assert result.kld is not None
    # the same quantity from both models' full logits, in float64, without the uint16 storage
    kl, same = [], []
    with llama.Model(tiny_llama3_gguf) as base_model, llama.Model(tiny_q4_0) as quant_model, \
            llama.Context(base_model, n_ctx=n_ctx, n_batch=n_ctx) as base, \
            llama.Context(quant_model, n_ctx=n_ctx, n_batch=n_ctx) as quant:
        tokens = base_model.tokenize(TEXT)
        for c in range(chunks):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
            chunk[0] = base_model.bos
            rows = []
            for ctx in (base, quant):
                ctx.clear()
                ctx.decode(chunk, np.arange(n_ctx, dtype=np.int32), np.zeros(n_ctx, np.int32), np.ones(n_ctx, np.int8))
                logits = ctx.logits(n_ctx)[n_ctx // 2:n_ctx - 1].astype(np.float64)
                rows.append(logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
                            - logits.max(1, keepdims=True))
            lp, lq = rows
            kl.extend((np.exp(lp) * (lp - lq)).sum(axis=1))
            same.extend(lp.argmax(1) == lq.argmax(1))
    assert result.kld.kld_mean == pytest.approx(float(np.mean(kl)), rel=0.02, abs=1e-5)
    assert result.kld.same_top == pytest.approx(float(np.mean(same)), abs=1 / len(same) + 1e-9)
    assert result.kld.kld_median <= result.kld.kld_p95 <= result.kld.kld_p99 <= result.kld.kld_max


def _full_log_probs(model, tokens, n_ctx: int, chunks: int) -> np.ndarray:
    """Float64 log-probabilities at the scored positions, straight from the model's logits."""
    rows = []
    with llama.Model(model) as m, llama.Context(m, n_ctx=n_ctx, n_batch=n_ctx) as ctx:
        for c in range(chunks):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
            chunk[0] = m.bos
            ctx.clear()
            ctx.decode(chunk, np.arange(n_ctx, dtype=np.int32), np.zeros(n_ctx, np.int32), np.ones(n_ctx, np.int8))
            x = ctx.logits(n_ctx)[n_ctx // 2:n_ctx - 1].astype(np.float64)
            x -= x.max(1, keepdims=True)
            rows.append(x - np.log(np.exp(x).sum(1, keepdims=True)))
    return np.concatenate(rows)


@pytest.mark.parametrize("top_k", [None, 8])
def test_compact_base_is_small_and_its_error_is_the_tail_divergence(tiny_llama3_gguf, tiny_q4_0, tmp_path, top_k):
    """The compact base (top k + the rest's mass) is 10x smaller than llama.cpp's by default, and its KLD is the true
    one minus p_rest * KL(P_rest || Q_rest), the divergence inside the tail, computed here from both models' full
    logits in float64. PPL, Δp and same-top come out as with the full base."""
    n_ctx, chunks = 64, 3
    full, compact = tmp_path / "full.logits", tmp_path / "compact.logits"
    measure.save_base_logits(tiny_llama3_gguf, full, TEXT, n_ctx=n_ctx, chunks=chunks)
    measure.save_base_logits(tiny_llama3_gguf, compact, TEXT, n_ctx=n_ctx, chunks=chunks, compact=True, top_k=top_k)
    n_vocab = llama.Model(tiny_llama3_gguf, vocab_only=True).n_vocab
    k = top_k or n_vocab // 48
    assert compact.stat().st_size == measure.base_logits_size(n_vocab, n_ctx, chunks, k)
    assert full.stat().st_size >= 10 * compact.stat().st_size
    a = measure.perplexity(tiny_q4_0, None, kld_base=full).kld
    b = measure.perplexity(tiny_q4_0, None, kld_base=compact).kld

    tokens = llama.Model(tiny_llama3_gguf, vocab_only=True).tokenize(TEXT)
    lp, lq = _full_log_probs(tiny_llama3_gguf, tokens, n_ctx, chunks), _full_log_probs(tiny_q4_0, tokens, n_ctx, chunks)
    true = (np.exp(lp) * (lp - lq)).sum(axis=1)
    top = np.argsort(-lp, axis=1)[:, :k]
    tail = np.ones_like(lp, dtype=bool)
    np.put_along_axis(tail, top, False, axis=1)
    p_rest, q_rest = (np.exp(lp) * tail).sum(1), (np.exp(lq) * tail).sum(1)
    inside = (np.exp(lp) * (lp - lq) * tail).sum(1) - p_rest * np.log(p_rest / q_rest)
    print(f"\ncompact base k={k}: KLD {b.kld_mean:.6f} vs {float(true.mean()):.6f}, tail mass {b.base_tail_mass:.3f}")
    assert b.kld_mean == pytest.approx(float((true - inside).mean()), rel=1e-3)
    assert b.kld_mean <= float(true.mean()) and b.base_top_k == k
    assert b.base_tail_mass == pytest.approx(float(p_rest.mean()), rel=1e-4)
    assert a.base_tail_mass is None
    assert (b.ppl, b.same_top, b.count if hasattr(b, "count") else 0) == (pytest.approx(a.ppl, rel=1e-6), a.same_top, 0)
    assert b.ppl_base == pytest.approx(a.ppl_base, rel=1e-3) and b.dp_mean == pytest.approx(a.dp_mean, abs=1e-3)


def test_kld_of_a_model_against_itself_is_zero(tiny_llama3_gguf, tmp_path):
    base = tmp_path / "self.logits"
    measure.save_base_logits(tiny_llama3_gguf, base, TEXT, n_ctx=64, chunks=2)
    result = measure.perplexity(tiny_llama3_gguf, None, kld_base=base)
    assert result.kld.kld_mean < 1e-6 and result.kld.same_top == 1.0
    assert result.kld.ppl_base == pytest.approx(result.ppl, rel=1e-4)


def test_speed_reports_llama_bench_statistics(tiny_llama3_gguf):
    result = measure.speed(tiny_llama3_gguf, n_prompt=64, n_gen=8, repetitions=3)
    pp, tg = result.test("pp"), result.test("tg")
    assert (pp.name, tg.name) == ("pp64", "tg8")
    assert len(pp.samples_ns) == len(tg.samples_ns) == 3
    ts = [64 / (ns / 1e9) for ns in pp.samples_ns]
    assert pp.avg_ts == pytest.approx(np.mean(ts)) and pp.stdev_ts == pytest.approx(np.std(ts, ddof=1))
    assert tg.ms_per_token == pytest.approx(np.mean(tg.samples_ns) / 8 / 1e6)
    assert result.backend["backend"] and result.n_params > 1e6 and result.threads >= 1


# ---------------------------------------------------------------------------------------------------------- CLI

def test_cli_ppl_json(tiny_llama3_gguf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    proc = run_cl3("ppl", tiny_llama3_gguf, "-f", text, "-c", "64", "--chunks", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"ppl", "stderr", "n_ctx", "chunks", "tokens"} <= data.keys()
    assert data["n_ctx"] == 64 and data["chunks"] == 2 and data["tokens"] == 2 * 31


@pytest.mark.parametrize("args, message", [
    (["ppl", "missing.gguf"], "no such GGUF file"),
    (["ppl", "{text}"], "not a GGUF file"),
    (["ppl", "{model}", "-f", "{text}", "-c", "4096"], "needs at least"),
    (["ppl", "{model}", "-f", "{text}", "--kld-base", "{text}"], "base-logits"),
    (["ppl", "{model}", "-f", "missing.txt"], "not found"),
    (["speed", "{model}", "-r", "0"], "repetitions"),
    (["speed", "missing.gguf"], "no such GGUF file"),
    (["speed", "{text}"], "not a GGUF file"),
])
def test_cli_bad_input_is_one_line(args, message, tiny_llama3_gguf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = [a.format(model=tiny_llama3_gguf, text=text) for a in args]
    one_line_error(run_cl3(*args), message)


# ------------------------------------------------------------------------------------------- llama.cpp parity

FINAL_ESTIMATE = r"Final estimate: PPL = [\d.]+ \+/- [\d.]+\s"


def _run_tool(*args, want: str) -> str:
    """A llama.cpp tool's whole log (stdout and stderr in one pipe).

    This llama.cpp logs from a background thread that is not flushed at exit (llama.cpp issue 22142), so the last
    lines are sometimes lost; the run is repeated until the line ``want`` matches is there.
    """
    args = [str(a) for a in args]
    if Path(args[0]).name == "llama-perplexity" and not hardware.extra_buffers_allowed():
        args.insert(1, "--no-repack")  # the kernels cl3 uses here (no AMX/repacked buffers): same arithmetic
    for _ in range(8):
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:]
        if re.search(want, proc.stdout):
            break
    return proc.stdout


def _final_estimate(log: str) -> tuple[float, float]:
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    assert m, log[-1500:]
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("n_ctx, n_batch", [(128, 2048), (128, 64)])
def test_parity_with_llama_perplexity(reference_bin, tiny_llama3_gguf, tmp_path, n_ctx, n_batch):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    ppl, err = _final_estimate(_run_tool(reference_bin / "llama-perplexity", "-m", tiny_llama3_gguf, "-f", text,
                                         "-c", n_ctx, "-b", n_batch, want=FINAL_ESTIMATE))
    ours = measure.perplexity(tiny_llama3_gguf, (TEXT * 3), n_ctx=n_ctx, n_batch=n_batch)
    assert ours.ppl == pytest.approx(ppl, rel=5e-3)
    assert ours.stderr == pytest.approx(err, rel=5e-3)


def test_kld_parity_with_llama_perplexity(reference_bin, tiny_llama3_gguf, tiny_q4_0, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    base = tmp_path / "ref.logits"
    tool = str(reference_bin / "llama-perplexity")
    _run_tool(tool, "-m", tiny_llama3_gguf, "-f", text, "-c", 64, "--kl-divergence-base", base, want=FINAL_ESTIMATE)
    log = _run_tool(tool, "-m", tiny_q4_0, "-c", 64, "--kl-divergence-base", base, "--kl-divergence", want=r"Same top p:\s+[\d.]+ ")
    kld = float(re.search(r"Mean    KLD:\s+([-\d.]+)", log).group(1))
    same = float(re.search(r"Same top p:\s+([\d.]+)", log).group(1))
    ours = measure.perplexity(tiny_q4_0, None, kld_base=base)   # llama.cpp's own base file
    assert ours.kld.kld_mean == pytest.approx(kld, rel=5e-3, abs=2e-6)
    assert 100 * ours.kld.same_top == pytest.approx(same, abs=0.01)
    # and llama-perplexity reads cl3's base file
    mine = tmp_path / "cl3.logits"
    measure.save_base_logits(tiny_llama3_gguf, mine, TEXT * 3, n_ctx=64)
    log = _run_tool(tool, "-m", tiny_q4_0, "-c", 64, "--kl-divergence-base", mine, "--kl-divergence", want=r"Same top p:\s+[\d.]+ ")
    kld2 = float(re.search(r"Mean    KLD:\s+([-\d.]+)", log).group(1))
    assert kld2 == pytest.approx(kld, rel=5e-3, abs=2e-6)


_NUM = r"\s*:?\s*([-\d.]+)"
# every statistic llama-perplexity --kl-divergence prints: (its label, KldStats field, scale)
KLD_LINES = [("Mean PPL(Q)", "ppl", 1), ("Mean PPL(base)", "ppl_base", 1),
             ("Cor(ln(PPL(Q)), ln(PPL(base)))", "ln_ppl_cor", 100),
             ("Mean ln(PPL(Q)/PPL(base))", "ln_ppl_ratio", 1), ("Mean PPL(Q)/PPL(base)", "ppl_ratio", 1),
             ("Mean PPL(Q)-PPL(base)", "ppl_diff", 1), ("Mean    KLD", "kld_mean", 1),
             ("Maximum KLD", "kld_max", 1), ("Median  KLD", "kld_median", 1), ("Minimum KLD", "kld_min", 1),
             ("Mean    Δp", "dp_mean", 100), ("Maximum Δp", "dp_max", 100), ("Median  Δp", "dp_median", 100),
             ("Minimum Δp", "dp_min", 100), ("RMS Δp    ", "dp_rms", 100), ("Same top p", "same_top", 100)]
KLD_LINES += [(f"{p}%   KLD", f"kld_{k}", 1) for p, k in (("99.9", "p99_9"), ("99.0", "p99"), ("95.0", "p95"),
                                                          ("90.0", "p90"), ("10.0", "p10"), (" 5.0", "p5"),
                                                          (" 1.0", "p1"), (" 0.1", "p0_1"))]
KLD_LINES += [(f"{p}%   Δp", f"dp_{k}", 100) for p, k in (("99.9", "p99_9"), ("99.0", "p99"), ("95.0", "p95"),
                                                         ("90.0", "p90"), ("75.0", "p75"), ("25.0", "p25"),
                                                         ("10.0", "p10"), (" 5.0", "p5"), (" 1.0", "p1"),
                                                         (" 0.1", "p0_1"))]
ERRORS = {"ppl": "ppl_stderr", "ppl_base": "ppl_base_stderr", "ln_ppl_ratio": "ln_ppl_ratio_stderr",
          "ppl_ratio": "ppl_ratio_stderr", "ppl_diff": "ppl_diff_stderr", "kld_mean": "kld_stderr",
          "dp_mean": "dp_stderr", "dp_rms": "dp_rms_stderr", "same_top": "same_top_stderr"}


def test_every_kld_statistic_equals_llama_perplexity(reference_bin, tiny_llama3_gguf, tiny_q4_0, tmp_path):
    """Each number llama-perplexity --kl-divergence prints (means with their ± errors, the KLD and Δp
    percentiles, correlation, PPL ratio and difference, same top) against cl3's, on the same base file."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 6, encoding="utf-8")
    base = tmp_path / "ref.logits"
    tool = str(reference_bin / "llama-perplexity")
    _run_tool(tool, "-m", tiny_llama3_gguf, "-f", text, "-c", 64, "--kl-divergence-base", base, want=FINAL_ESTIMATE)
    log = _run_tool(tool, "-m", tiny_q4_0, "-c", 64, "--kl-divergence-base", base, "--kl-divergence",
                    want=r"Same top p:\s+[\d.]+ ")
    result = measure.perplexity(tiny_q4_0, None, kld_base=base)
    ours = result.kld
    assert result.tokens >= 100  # llama-perplexity prints no statistics below 100 tokens
    log = log[log.index("====== Perplexity statistics"):]
    for label, key, scale in KLD_LINES:
        m = re.search(re.escape(label) + _NUM + r"(?:\s*%?\s*±\s*([\d.]+))?", log)
        assert m and "." in m.group(1), (label, log)
        theirs = float(m.group(1))
        digits = len(m.group(1).split(".")[1])
        tolerance = max(1.5 * 10 ** -digits, 5e-3 * abs(theirs))
        assert scale * getattr(ours, key) == pytest.approx(theirs, abs=tolerance), (label, getattr(ours, key), theirs)
        if m.group(2) and key in ERRORS:
            err = float(m.group(2))
            assert scale * getattr(ours, ERRORS[key]) == pytest.approx(err, abs=max(1.5 * 10 ** -digits, 5e-3 * err)), \
                label
