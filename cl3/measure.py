"""Perplexity, KL divergence and speed of a GGUF model, computed the way llama.cpp's own tools compute them.

- :func:`perplexity` is llama-perplexity's default method (tools/perplexity/perplexity.cpp): the whole text is
  tokenized once (with BOS when the model adds one), cut into non-overlapping chunks of ``n_ctx`` tokens, the first
  token of each chunk is replaced by BOS, and only the second half of each chunk is scored. ``n_batch // n_ctx``
  chunks are decoded side by side as separate sequences, as llama-perplexity does. PPL = exp(mean NLL) and its
  standard error is PPL * sqrt(var(NLL) / (N - 1)).
- :func:`save_base_logits` / ``perplexity(..., kld_base=...)`` are ``--kl-divergence-base`` / ``--kl-divergence``.
  The base file is llama.cpp's own format, so files written by either tool work with the other (see BASE_LOGITS_FORMAT).
- :func:`speed` is llama-bench's pp/tg test: a warm-up run, then ``repetitions`` timed runs on random tokens in a fresh
  context of n_prompt (or n_gen) cells; tokens/s per run, reported as mean ± sample standard deviation.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import llama, paths
from .errors import InputError, UsageError
from .files import atomic_output, check_new_output
from .scoring import ChunkLayout, nll, score_chunks

Progress = Callable[[int, int], None]

BASE_LOGITS_MAGIC = b"_logits_"
BASE_LOGITS_FORMAT = """\
llama.cpp's --kl-divergence-base file (little-endian):
  "_logits_" | uint32 n_ctx | int32 n_vocab | int32 n_chunk | int32 tokens[n_chunk * n_ctx]
  then, for every scored token (n_ctx - 1 - n_ctx/2 per chunk), nv = 2*ceil(n_vocab/2) + 4 uint16:
  float32 scale, float32 min_log_prob, then n_vocab uint16 q[i] with log p[i] = scale * q[i] + min_log_prob
  (log-probabilities more than 16 below the top one are stored as 0 = the floor).
Size: 2*nv bytes per scored token, i.e. about 2 bytes per vocabulary entry: 256.5 KB/token for Llama-3's 128,256.
"""
TOPK_MAGIC = b"_cl3topk"
TOPK_FORMAT = """\
cl3's compact base file (little-endian), same header and tokens as llama.cpp's with the magic "_cl3topk" and a
uint32 k after n_chunk; then, for every scored token: int32 ids[k] (the base model's k most likely tokens, most
likely first), float32 log_p[k], float32 log_p_rest (the log of the probability of all other tokens together),
float32 log_p_target (of the token that follows). 8k + 8 bytes per token against llama.cpp's 2 n_vocab + 8: the
default k = n_vocab / 48 makes it 11-12x smaller (k = 2,672 for Llama-3's 128,256 tokens); k = 64: 490x for Llama-3.
KL divergence from it treats the other tokens as one outcome: sum_top p (log p - log q) + p_rest log(p_rest/q_rest).
That is never above the true value (log-sum inequality) and misses p_rest * KL(P_rest || Q_rest), the divergence
inside the tail; every other statistic (PPL, Δp, same top) is exact.
"""
COMPACT_RATIO = 48  # the default k of a compact base is n_vocab / 48: over 10x smaller than llama.cpp's


def default_top_k(n_vocab: int) -> int:
    return max(1, n_vocab // COMPACT_RATIO)


# ---------------------------------------------------------------------------------------------------------- results

@dataclass
class KldStats:
    """llama-perplexity --kl-divergence's statistics, every one it prints (names follow its printout)."""

    ppl: float                     # Mean PPL(Q)
    ppl_stderr: float
    ppl_base: float
    ppl_base_stderr: float
    ln_ppl_cor: float              # Cor(ln(PPL(Q)), ln(PPL(base))), as a fraction
    ln_ppl_ratio: float            # mean ln(PPL(Q)/PPL(base))
    ln_ppl_ratio_stderr: float
    ppl_ratio: float               # Mean PPL(Q)/PPL(base)
    ppl_ratio_stderr: float
    ppl_diff: float                # Mean PPL(Q)-PPL(base)
    ppl_diff_stderr: float
    kld_mean: float
    kld_stderr: float
    kld_max: float
    kld_p99_9: float
    kld_p99: float
    kld_p95: float
    kld_p90: float
    kld_median: float
    kld_p10: float
    kld_p5: float
    kld_p1: float
    kld_p0_1: float
    kld_min: float
    dp_mean: float                 # mean Δp = p(Q) - p(base) of the actual next token, as a fraction
    dp_stderr: float
    dp_max: float
    dp_p99_9: float
    dp_p99: float
    dp_p95: float
    dp_p90: float
    dp_p75: float
    dp_median: float
    dp_p25: float
    dp_p10: float
    dp_p5: float
    dp_p1: float
    dp_p0_1: float
    dp_min: float
    dp_rms: float
    dp_rms_stderr: float
    same_top: float                # fraction of tokens where both models' most likely token is the same
    same_top_stderr: float
    base_top_k: int = 0            # a compact base: its k (the KLD is then a lower bound, see TOPK_FORMAT)
    base_tail_mass: float | None = None  # a compact base: mean probability outside its top k


@dataclass
class PerplexityResult:
    model: str
    ppl: float
    stderr: float
    n_ctx: int
    n_batch: int
    chunks: int
    tokens: int                    # scored tokens
    text_tokens: int               # tokens of the whole text
    seconds: float
    threads: int
    backend: str = "CPU"           # where the layers ran, e.g. "CPU", "CUDA0 (all layers)"
    kld: KldStats | None = None
    kld_base: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedTest:
    name: str                      # "pp512" / "tg128", as llama-bench names its tests
    n_prompt: int
    n_gen: int
    samples_ns: list[int]

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [1e9 * self.n_tokens / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return float(np.mean(self.samples_ts))

    @property
    def stdev_ts(self) -> float:
        ts = self.samples_ts
        return float(np.std(ts, ddof=1)) if len(ts) > 1 else 0.0

    @property
    def ms_per_token(self) -> float:
        """Mean wall time per token (ms): mean run time / tokens per run."""
        return float(np.mean(self.samples_ns)) / self.n_tokens / 1e6

    @property
    def ms_per_token_stdev(self) -> float:
        ns = self.samples_ns
        return float(np.std(ns, ddof=1)) / self.n_tokens / 1e6 if len(ns) > 1 else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "n_prompt": self.n_prompt, "n_gen": self.n_gen, "samples_ns": self.samples_ns,
                "avg_ts": self.avg_ts, "stdev_ts": self.stdev_ts, "ms_per_token": self.ms_per_token,
                "ms_per_token_stdev": self.ms_per_token_stdev}


@dataclass
class SpeedResult:
    model: str
    description: str               # llama.cpp's model description, e.g. "llama 8B Q4_K - Medium"
    model_bytes: int
    n_params: int
    threads: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    repetitions: int
    backend: dict = field(default_factory=dict)
    tests: list[SpeedTest] = field(default_factory=list)

    def test(self, kind: str) -> SpeedTest | None:
        return next((t for t in self.tests if t.name.startswith(kind)), None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tests"] = [t.to_dict() for t in self.tests]
        return d


# ------------------------------------------------------------------------------------------------------ perplexity

def _quantize_log_probs(logits: np.ndarray, targets: np.ndarray, nv: int) -> tuple[np.ndarray, np.ndarray]:
    """llama-perplexity's uint16 log-probability rows (see BASE_LOGITS_FORMAT) and the NLL of each target."""
    m, n_vocab = logits.shape
    mx = logits.max(axis=1)
    mn = np.maximum(logits.min(axis=1), mx - np.float32(16))
    sum_exp = np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)
    lse = np.log(sum_exp).astype(np.float32)
    min_log_prob = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    rows = np.zeros((m, nv), dtype=np.uint16)
    header = np.stack([scale, min_log_prob], axis=1).astype("<f4")
    rows[:, :4] = header.view("<u2").reshape(m, 4)
    nz = scale != 0
    if nz.any():
        inv = (np.float32(1) / scale[nz])[:, None]
        lg, lo = logits[nz], mn[nz][:, None]
        q = np.rint(inv * (lg - lo))
        rows[nz, 4:4 + n_vocab] = np.where(lg > lo, np.clip(q, 0, 65535), 0).astype(np.uint16)
    picked = logits[np.arange(m), targets]
    nll = (mx + lse - picked).astype(np.float64)
    return rows, nll


class _KldAccumulator:
    """The sums of llama-perplexity's kl_divergence_result, fed with blocks of rows."""

    def __init__(self):
        self.sum_nll = self.sum_nll2 = self.sum_nll_base = self.sum_nll_base2 = self.sum_nll_nll_base = 0.0
        self.sum_kld = self.sum_kld2 = self.sum_p_diff = self.sum_p_diff2 = self.sum_p_diff4 = 0.0
        self.n_same_top = self.count = 0
        self.top_k, self.sum_tail = 0, 0.0
        self.kld_values: list[np.ndarray] = []
        self.p_diff_values: list[np.ndarray] = []

    def add(self, logits: np.ndarray, targets: np.ndarray, base_rows: np.ndarray) -> None:
        """Rows of llama.cpp's uint16 base file."""
        m, n_vocab = logits.shape
        rows = np.arange(m)
        mx = logits.max(axis=1)
        imax = logits.argmax(axis=1)
        lse = np.log(np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
        head = np.ascontiguousarray(base_rows[:, :4]).view("<f4").reshape(m, 2)
        scale, min_log_prob = head[:, 0], head[:, 1]
        nll = (mx + lse - logits[rows, targets]).astype(np.float32)
        q = base_rows[:, 4:4 + n_vocab]
        nll_base = -(scale * q[rows, targets].astype(np.float32) + min_log_prob)
        p_log_base = scale[:, None] * q.astype(np.float32) + min_log_prob[:, None]
        terms = np.exp(p_log_base) * (p_log_base - logits + (mx + lse)[:, None])
        kld = np.where(p_log_base > np.float32(-16), terms, np.float32(0)).sum(axis=1, dtype=np.float64)
        self._add(nll, nll_base, kld, imax == p_log_base.argmax(axis=1))

    def add_top_k(self, logits: np.ndarray, targets: np.ndarray, base: np.ndarray) -> None:
        """Rows of cl3's compact base file (see TOPK_FORMAT)."""
        m = len(logits)
        rows = np.arange(m)
        mx = logits.max(axis=1).astype(np.float64)
        log_q = logits.astype(np.float64) - mx[:, None]
        log_q -= np.log(np.exp(log_q).sum(axis=1))[:, None]
        ids, log_p = base["ids"], base["log_p"].astype(np.float64)
        log_q_top = log_q[rows[:, None], ids]
        p_rest = np.exp(base["log_p_rest"].astype(np.float64))
        self.top_k, self.sum_tail = ids.shape[1], self.sum_tail + float(p_rest.sum())
        q_rest = np.maximum(1.0 - np.exp(log_q_top).sum(axis=1), 1e-300)
        tail = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
        kld = (np.exp(log_p) * (log_p - log_q_top)).sum(axis=1) + tail
        nll = (-log_q[rows, targets]).astype(np.float32)
        self._add(nll, (-base["log_p_target"]).astype(np.float32), kld, logits.argmax(axis=1) == ids[:, 0])

    def _add(self, nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, same_top: np.ndarray) -> None:
        m = len(nll)
        self.sum_nll += float(nll.sum(dtype=np.float64))
        self.sum_nll2 += float((nll.astype(np.float64) ** 2).sum())
        self.sum_nll_base += float(nll_base.sum(dtype=np.float64))
        self.sum_nll_base2 += float((nll_base.astype(np.float64) ** 2).sum())
        self.sum_nll_nll_base += float((nll.astype(np.float64) * nll_base).sum())
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld ** 2).sum())
        self.n_same_top += int(np.count_nonzero(same_top))
        self.count += m

        p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
        self.sum_p_diff += float(p_diff.sum(dtype=np.float64))
        p_diff2 = p_diff.astype(np.float64) ** 2
        self.sum_p_diff2 += float(p_diff2.sum())
        self.sum_p_diff4 += float((p_diff2 ** 2).sum())
        self.kld_values.append(kld.astype(np.float32))
        self.p_diff_values.append(p_diff)

    def ppl(self) -> tuple[float, float]:
        mean, err = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count)
        return math.exp(mean), math.exp(mean) * err

    def stats(self) -> KldStats:
        n = self.count
        log_ppl = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, n)
        log_base = _mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, n)
        cov = _covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, n)
        ratio_err = math.sqrt(max(0.0, log_ppl[1] ** 2 + log_base[1] ** 2 - 2.0 * cov))
        kld = _mean_and_uncertainty(self.sum_kld, self.sum_kld2, n)
        dp = _mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, n)
        mse = _mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, n)
        rms = math.sqrt(mse[0])
        same = self.n_same_top / n if n else 0.0
        kv = np.sort(np.concatenate(self.kld_values)) if self.kld_values else np.zeros(1, np.float32)
        pv = np.sort(np.concatenate(self.p_diff_values)) if self.p_diff_values else np.zeros(1, np.float32)
        ppl, ppl_base = math.exp(log_ppl[0]), math.exp(log_base[0])
        ppl_err, base_err = ppl * log_ppl[1], ppl_base * log_base[1]
        ratio = math.exp(log_ppl[0] - log_base[0])
        kp = {f"kld_{k}": _percentile(kv, f) for k, f in _PERCENTILES.items() if k not in ("p75", "p25")}
        dpp = {f"dp_{k}": _percentile(pv, f) for k, f in _PERCENTILES.items()}
        return KldStats(
            ppl=ppl, ppl_stderr=ppl_err, ppl_base=ppl_base, ppl_base_stderr=base_err,
            ln_ppl_cor=cov / (log_ppl[1] * log_base[1]) if log_ppl[1] * log_base[1] > 0 else float("nan"),
            ln_ppl_ratio=log_ppl[0] - log_base[0], ln_ppl_ratio_stderr=ratio_err,
            ppl_ratio=ratio, ppl_ratio_stderr=ratio * ratio_err, ppl_diff=ppl - ppl_base,
            ppl_diff_stderr=math.sqrt(max(0.0, ppl_err ** 2 + base_err ** 2 - 2.0 * ppl * ppl_base * cov)),
            kld_mean=kld[0], kld_stderr=kld[1], kld_max=float(kv[-1]), kld_median=_median(kv), kld_min=float(kv[0]),
            **kp, dp_mean=dp[0], dp_stderr=dp[1], dp_max=float(pv[-1]), dp_median=_median(pv), dp_min=float(pv[0]),
            **dpp, dp_rms=rms, dp_rms_stderr=0.5 / rms * mse[1] if rms > 0 else 0.0,
            same_top=same, same_top_stderr=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            base_top_k=self.top_k, base_tail_mass=self.sum_tail / n if self.top_k and n else None)


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


def _covariance(a: float, b: float, ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (ab / count - (a / count) * (b / count)) / (count - 1)


_PERCENTILES = {"p99_9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p75": 0.75, "p25": 0.25, "p10": 0.10,
                "p5": 0.05, "p1": 0.01, "p0_1": 0.001}


def _percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation at fraction * (n - 1), in float32."""
    p = np.float32(fraction) * np.float32(len(values) - 1)
    i = int(p)
    p -= np.float32(i)
    return float((np.float32(1) - p) * values[i] + p * values[min(i + 1, len(values) - 1)])


def _median(values: np.ndarray) -> float:
    n = len(values)
    return float(0.5 * (values[n // 2] + values[n // 2 - 1])) if n % 2 == 0 else float(values[n // 2])


def _read_text(text: str | None) -> str:
    if text is not None:
        return text
    from .calibration import evaluation_text

    return evaluation_text()


def perplexity(model: str | os.PathLike, text: str | None = None, *, n_ctx: int = 512, n_batch: int = 2048,
               chunks: int | None = None, threads: int | None = None, n_gpu_layers: int = -1,
               kld_base: str | os.PathLike | None = None, progress: Progress | None = None,
               on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: the built-in evaluation text), llama-perplexity's way.

    With ``kld_base`` (a base-logits file from :func:`save_base_logits` or llama-perplexity --kl-divergence-base,
    or a base GGUF model, whose logits are then computed once and cached), the tokens come from the base run and
    the KL-divergence statistics are added. ``on_chunk(chunks_done, running_ppl)`` follows the progress.
    """
    if kld_base is not None:
        base_file = _base_logits_file(Path(kld_base), text, n_ctx=n_ctx, n_batch=n_batch, chunks=chunks,
                                      threads=threads, n_gpu_layers=n_gpu_layers)
        return _kl_divergence(model, base_file, n_batch=n_batch, threads=threads, n_gpu_layers=n_gpu_layers,
                              progress=progress, on_chunk=on_chunk, kld_base=str(kld_base))
    return _perplexity(model, _read_text(text), n_ctx=n_ctx, n_batch=n_batch, chunks=chunks, threads=threads,
                       n_gpu_layers=n_gpu_layers, progress=progress, on_chunk=on_chunk)


def _perplexity(model, text: str, *, n_ctx: int, n_batch: int, chunks: int | None, threads: int | None,
                n_gpu_layers: int, progress: Progress | None, on_chunk, base_out: Path | None = None,
                top_k: int = 0) -> PerplexityResult:
    layout = ChunkLayout.of(n_ctx, n_batch)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        m = stack.enter_context(llama.Model(model, n_gpu_layers=n_gpu_layers))
        if m.add_eos:
            raise InputError(f"{model}: the model appends EOS to every text; perplexity is undefined for it")
        tokens = m.tokenize(text)
        n_chunk = layout.chunks_in(len(tokens), chunks)
        top_k = min(default_top_k(m.n_vocab) if top_k < 0 else top_k, m.n_vocab)
        ctx = stack.enter_context(llama.Context(m, n_ctx=layout.ctx_size, n_batch=layout.n_batch,
                                                n_seq=layout.n_seq, threads=threads))
        sums = {"nll": 0.0, "nll2": 0.0, "count": 0}
        nv = 2 * ((m.n_vocab + 1) // 2) + 4
        out = stack.enter_context(open(base_out, "wb")) if base_out is not None else None
        if out is not None:
            if top_k:
                out.write(TOPK_MAGIC + struct.pack("<IiiI", n_ctx, m.n_vocab, n_chunk, top_k))
            else:
                out.write(BASE_LOGITS_MAGIC + struct.pack("<Iii", n_ctx, m.n_vocab, n_chunk))
            out.write(tokens[: n_chunk * n_ctx].astype("<i4").tobytes())

        def on_rows(chunk: int, logits: np.ndarray, targets: np.ndarray) -> None:
            if out is not None and top_k:
                rows, row_nll = _top_k_rows(logits, targets, top_k)
                out.write(rows.tobytes())
            elif out is not None:
                rows, row_nll = _quantize_log_probs(logits, targets, nv)
                out.write(rows.tobytes())
            else:
                row_nll = nll(logits, targets)
            sums["nll"] += float(row_nll.sum())
            sums["nll2"] += float((row_nll * row_nll).sum())
            sums["count"] += len(row_nll)

        def after_group(done: int, total: int) -> None:
            if progress:
                progress(done, total)
            if on_chunk:
                on_chunk(done, math.exp(sums["nll"] / sums["count"]))

        score_chunks(ctx, tokens, layout, n_chunk, on_rows, after_group=after_group)
        used_threads, backend = ctx.threads, m.backend
    count = sums["count"]
    mean = sums["nll"] / count
    var = sums["nll2"] / count - mean * mean
    ppl = math.exp(mean)
    stderr = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(model=str(model), ppl=ppl, stderr=stderr, n_ctx=n_ctx, n_batch=layout.n_batch,
                            chunks=n_chunk, tokens=count, text_tokens=len(tokens), seconds=time.perf_counter() - t0,
                            threads=used_threads, backend=backend)


# ---------------------------------------------------------------------------------------------------- KL divergence

def save_base_logits(model: str | os.PathLike, out: str | os.PathLike, text: str | None = None, *, n_ctx: int = 512,
                     n_batch: int = 2048, chunks: int | None = None, threads: int | None = None,
                     n_gpu_layers: int = -1, compact: bool = False, top_k: int | None = None, force: bool = False,
                     progress: Progress | None = None) -> PerplexityResult:
    """Run the base model once and store its token distributions: llama-perplexity --kl-divergence-base's file, or,
    ``compact``, cl3's (each token's ``top_k`` most likely tokens and the rest's mass, see TOPK_FORMAT; default
    k = n_vocab / 48)."""
    if top_k is not None and not 1 <= top_k <= 1 << 20:
        raise UsageError(f"top-k must be between 1 and 2^20, not {top_k}", param="top_k")
    top_k = (top_k or -1) if compact or top_k else 0
    check_new_output(Path(out), force)
    with atomic_output(out) as tmp:
        return _perplexity(model, _read_text(text), n_ctx=n_ctx, n_batch=n_batch, chunks=chunks, threads=threads,
                           n_gpu_layers=n_gpu_layers, progress=progress, on_chunk=None, base_out=tmp, top_k=top_k)


def base_logits_size(n_vocab: int, n_ctx: int, n_chunk: int, top_k: int = 0) -> int:
    """Bytes of a base-logits file: llama.cpp's (uint16 log-probabilities) or, with ``top_k``, cl3's compact one."""
    scored = (n_ctx - 1 - n_ctx // 2) * n_chunk
    if top_k:
        return 24 + 4 * n_ctx * n_chunk + (8 * top_k + 8) * scored
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return 20 + 4 * n_ctx * n_chunk + 2 * nv * scored


def _top_k_dtype(k: int) -> np.dtype:
    return np.dtype([("ids", "<i4", (k,)), ("log_p", "<f4", (k,)), ("log_p_rest", "<f4"), ("log_p_target", "<f4")])


def _top_k_rows(logits: np.ndarray, targets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The compact base rows of a block of logits, and the NLL of each target."""
    m, n_vocab = logits.shape
    k = min(k, n_vocab)
    rows = np.arange(m)
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    e = np.exp(x)
    total = e.sum(axis=1)
    log_p = x - np.log(total)[:, None]
    top = np.argpartition(-log_p, k - 1, axis=1)[:, :k] if k < n_vocab else np.tile(np.arange(n_vocab), (m, 1))
    top = np.take_along_axis(top, np.argsort(-log_p[rows[:, None], top], axis=1, kind="stable"), axis=1)
    out = np.zeros(m, dtype=_top_k_dtype(k))
    out["ids"] = top
    out["log_p"] = log_p[rows[:, None], top]
    rest = (total - e[rows[:, None], top].sum(axis=1)) / total
    with np.errstate(divide="ignore"):
        out["log_p_rest"] = np.where(rest > 0, np.log(np.maximum(rest, 1e-300)), -np.inf)
    out["log_p_target"] = log_p[rows, targets]
    return out, -log_p[rows, targets]


@dataclass
class _BaseFile:
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray
    offset: int
    top_k: int          # 0: llama.cpp's uint16 rows


def _read_base_header(path: Path) -> _BaseFile:
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 20 or head[:8] not in (BASE_LOGITS_MAGIC, TOPK_MAGIC):
            raise InputError(f"{path} is neither a GGUF model nor a base-logits file (llama-perplexity "
                             "--kl-divergence-base format, or cl3's compact one)")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
        top_k = struct.unpack("<I", head[20:24])[0] if head[:8] == TOPK_MAGIC and len(head) == 24 else 0
        if head[:8] == TOPK_MAGIC and not top_k:
            raise InputError(f"{path} is truncated")
        f.seek(24 if top_k else 20)
        tokens = np.fromfile(f, dtype="<i4", count=n_ctx * n_chunk)
        offset = f.tell()
    if len(tokens) != n_ctx * n_chunk or path.stat().st_size < base_logits_size(n_vocab, n_ctx, n_chunk, top_k):
        raise InputError(f"{path} is truncated")
    return _BaseFile(n_ctx, n_vocab, n_chunk, tokens.astype(np.int32), offset, top_k)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _base_logits_file(base: Path, text: str | None, *, n_ctx: int, n_batch: int, chunks: int | None,
                      threads: int | None, n_gpu_layers: int) -> Path:
    """The base-logits file for ``base``: itself if it is one, else a cached run of the base model."""
    if not base.is_file():
        raise InputError(f"KLD base not found: {base}")
    if not _is_gguf(base):
        return base
    text = _read_text(text)
    st = base.stat()
    key = hashlib.sha256(f"{base.resolve()}|{st.st_size}|{st.st_mtime_ns}|{n_ctx}|{n_batch}|{chunks}|".encode()
                         + text.encode()).hexdigest()[:24]
    cache = paths.cache_dir() / "kld-base"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{base.stem}-c{n_ctx}-{key}.logits"
    if not path.exists():
        save_base_logits(base, path, text, n_ctx=n_ctx, n_batch=n_batch, chunks=chunks, threads=threads,
                         n_gpu_layers=n_gpu_layers, force=True)
    return path


def _kl_divergence(model, base_file: Path, *, n_batch: int, threads: int | None, n_gpu_layers: int,
                   progress: Progress | None, on_chunk, kld_base: str) -> PerplexityResult:
    head = _read_base_header(base_file)
    n_ctx, n_vocab, n_chunk, tokens = head.n_ctx, head.n_vocab, head.n_chunk, head.tokens
    layout = ChunkLayout.of(n_ctx, n_batch)
    per_chunk = layout.scored_per_chunk
    if head.top_k:
        base = np.memmap(base_file, dtype=_top_k_dtype(head.top_k), mode="r", offset=head.offset,
                         shape=(n_chunk * per_chunk,))
    else:
        nv = 2 * ((n_vocab + 1) // 2) + 4
        base = np.memmap(base_file, dtype="<u2", mode="r", offset=head.offset, shape=(n_chunk * per_chunk, nv))
    acc = _KldAccumulator()
    add = acc.add_top_k if head.top_k else acc.add
    t0 = time.perf_counter()
    with llama.Model(model, n_gpu_layers=n_gpu_layers) as m, \
            llama.Context(m, n_ctx=layout.ctx_size, n_batch=layout.n_batch, n_seq=layout.n_seq, threads=threads) as ctx:
        if m.n_vocab != n_vocab:
            raise InputError(f"{model} has a vocabulary of {m.n_vocab} tokens but the KLD base has {n_vocab}")
        done = {}

        def on_rows(chunk: int, logits: np.ndarray, targets: np.ndarray) -> None:
            at = done.get(chunk, 0)
            row0 = chunk * per_chunk + at
            add(logits, targets, np.asarray(base[row0: row0 + len(targets)]))
            done[chunk] = at + len(targets)

        def after_group(n_done: int, total: int) -> None:
            if progress:
                progress(n_done, total)
            if on_chunk:
                on_chunk(n_done, acc.ppl()[0])

        score_chunks(ctx, tokens, layout, n_chunk, on_rows, after_group=after_group)
        used_threads, backend = ctx.threads, m.backend
    ppl, stderr = acc.ppl()
    return PerplexityResult(model=str(model), ppl=ppl, stderr=stderr, n_ctx=n_ctx, n_batch=layout.n_batch,
                            chunks=n_chunk, tokens=acc.count, text_tokens=len(tokens),
                            seconds=time.perf_counter() - t0, threads=used_threads, backend=backend,
                            kld=acc.stats(), kld_base=kld_base)


# ----------------------------------------------------------------------------------------------------------- speed

def speed(model: str | os.PathLike, *, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 5,
          threads: int | None = None, n_gpu_layers: int = -1, n_batch: int = 2048, n_ubatch: int = 512,
          warmup: bool = True, seed: int = 0, progress: Progress | None = None) -> SpeedResult:
    """Prompt-processing (pp) and text-generation (tg) speed, llama-bench's way (one test each, like its defaults)."""
    if repetitions < 1:
        raise UsageError("repetitions must be at least 1")
    if n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0:
        raise UsageError("nothing to measure: both the prompt and the generation lengths are 0")
    rng = np.random.default_rng(seed)
    info = llama.backend_info()
    tests = [(f"pp{n_prompt}", n_prompt, 0)] if n_prompt else []
    tests += [(f"tg{n_gen}", 0, n_gen)] if n_gen else []
    total = len(tests) * (repetitions + int(warmup))
    done = 0
    with llama.Model(model, n_gpu_layers=n_gpu_layers) as m:
        result = SpeedResult(model=str(model), description=m.description, model_bytes=m.n_bytes, n_params=m.n_params,
                             threads=threads or llama.physical_cpu_count(), n_batch=n_batch, n_ubatch=n_ubatch,
                             n_gpu_layers=n_gpu_layers, repetitions=repetitions, backend=info | {"layers": m.backend})
        for name, pp, tg in tests:  # a fresh context per test, as llama-bench makes
            with llama.Context(m, n_ctx=pp + tg, n_batch=n_batch, n_ubatch=n_ubatch, threads=threads,
                               threadpool=True) as ctx:
                def run(ctx=ctx, pp=pp, tg=tg) -> None:
                    _run_prompt(ctx, pp, rng) if pp else _run_gen(ctx, tg, rng)

                if warmup:
                    run(tg=1)
                    done += 1
                    if progress:
                        progress(done, total)
                samples = []
                for _ in range(repetitions):
                    ctx.clear()
                    t0 = time.perf_counter_ns()
                    run()
                    samples.append(time.perf_counter_ns() - t0)
                    done += 1
                    if progress:
                        progress(done, total)
                result.tests.append(SpeedTest(name, pp, tg, samples))
    return result


def _run_prompt(ctx: llama.Context, n_prompt: int, rng: np.random.Generator) -> None:
    """llama-bench's test_prompt: random tokens (BOS first when the model adds one) in n_batch pieces."""
    model = ctx.model
    done = 0
    while done < n_prompt:
        n = min(n_prompt - done, ctx.n_batch)
        toks = rng.integers(0, model.n_vocab, n, dtype=np.int32)
        if done == 0 and model.add_bos:
            toks[0] = model.bos
        output = np.zeros(n, dtype=np.int8)
        output[-1] = 1
        ctx.decode(toks, np.arange(done, done + n, dtype=np.int32), np.zeros(n, np.int32), output)
        done += n
    ctx.synchronize()


def _run_gen(ctx: llama.Context, n_gen: int, rng: np.random.Generator) -> None:
    """llama-bench's test_gen: one token per decode, synchronised after each."""
    model = ctx.model
    token = model.bos if model.add_bos else int(rng.integers(0, model.n_vocab))
    one = np.zeros(1, np.int32)
    flag = np.ones(1, np.int8)
    for i in range(n_gen):
        ctx.decode(np.array([token], np.int32), np.array([i], np.int32), one, flag)
        ctx.synchronize()
        token = int(rng.integers(0, model.n_vocab))


def memory_bandwidth_floor_ms(model_bytes: int, bandwidth_gbs: float) -> float:
    """The least time one generated token can take when every weight byte is read once: bytes / bandwidth."""
    return model_bytes / (bandwidth_gbs * 1e9) * 1e3
