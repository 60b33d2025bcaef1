"""The demo model: a tiny Llama-3-format checkpoint that really predicts text, built from statistics in seconds.

No training loop. The tokenizer is trained on cl3's built-in calibration text (the evaluation text stays held out),
then the weights are written down directly:

1. A smoothed bigram model of the calibration tokens (interpolated Kneser-Ney), as log-probabilities, row-centred
   and factorised by a truncated SVD: ``logit[t, j] ≈ u_t · v_j``.
2. The hidden space (512) has two halves aligned with llama.cpp's 256-element quantization blocks. The *code half*
   holds the token embedding: a constant direction ``b`` plus a random unit code ``c_t`` (codes are near-orthogonal).
   The *factor half* starts empty.
3. Each layer's MLP is a key-value memory with one neuron per token (ffn = vocab): gate row = ``α (c_t - θ b)``, so
   SiLU(gate) fires only for the matching code, up row = ``c_t``. Layer 0's down column writes ``u_t`` plus a
   random detour ``d_t`` (``DETOUR`` times as long) into the factor half; the last layer's takes the detour back
   out. Rounding errors in those weights therefore reach the logits amplified, as they do through the many layers
   of a real model, which makes the quantization types' ordering visible. A filler along a fixed direction gives
   every token the same residual norm after each layer, so RMSNorm scales all tokens alike.
4. ``output.weight`` row j is ``v_j`` in the factor half. Attention is present but nearly silent (tiny o_proj).
5. Outlier channels, as in real models: the RMSNorm weights before the MLPs and the output are log-normal
   (σ = ``CHANNEL_SPREAD``) and the matrices reading them are divided by them. The function is the same, but a small
   weight may now meet a large input, which plain quantization (weighting by weight size) cannot see and an
   importance matrix (mean squared input per column) can: imatrix quantization beats plain quantization here, as it
   does on real models, while on a model without such channels (one code per token) it would not.

The transformer layers therefore carry the model's knowledge: without the MLPs the factor half stays empty and the
logits are flat. Every matrix row length is a multiple of 256, so llama.cpp's K-quants apply to every tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .calibration import calibration_text
from .errors import Cl3Error, InputError
from .hf_writer import (
    LLAMA3_SPECIAL_TOKENS,
    BuiltCheckpoint,
    llama_config,
    train_llama3_tokenizer,
    write_llama3_checkpoint,
)

DEMO_NAME = "cl3-Demo-Llama3"  # GGUF file names: Cl3-Demo-Llama3-10M-F16.gguf
DEMO_VOCAB = 2048          # including the 16 Llama-3 special tokens
DEMO_SHAPE = {"hidden": 512, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": DEMO_VOCAB}
CODE_DIMS = 256            # the code half: hidden[:256]; the factor half: hidden[256:]
RANK = 224                 # SVD rank of the bigram logits; the rest of the factor half carries the filler
DISCOUNT = 0.75            # Kneser-Ney discount (chosen on a held-out split of the calibration text)
UNIFORM_MIX = 0.01         # share of the uniform distribution in the continuation probabilities
THRESHOLD = 0.5            # gate fires when code · input > THRESHOLD (matching code: 1; others: |ρ| < ~0.35)
GATE_GAIN = 40.0           # α: sharpness of the gate
DETOUR = 2.0               # size of the detour relative to the typical |u_t|
ATTENTION_GAIN = 1e-3      # scale of o_proj: attention contributes noise at this level only
CHANNEL_SPREAD = 1.0       # σ of the log-normal RMSNorm weights (outlier channels); the matrices reading them are
                           # divided by them, so the function is unchanged but weight size no longer shows importance


def build_demo_checkpoint(out_dir: str | Path, *, seed: int = 1) -> BuiltCheckpoint:
    """Build the demo model as an HF checkpoint (f16 safetensors) in `out_dir`.

    The default seed (of the random codes) is one whose table keeps the published ordering of all nine types on the
    evaluation text; for some seeds the outlier channels hurt Q4_K_M more than Q4_0, or Q5_K_M more than Q5_0.
    """
    text = calibration_text()
    docs = tokenizer_documents(text)
    n_base = DEMO_VOCAB - len(LLAMA3_SPECIAL_TOKENS)
    tok = train_llama3_tokenizer(docs, n_base)
    if tok.get_vocab_size() != DEMO_VOCAB:
        raise InputError(f"the built-in calibration text is too small for the demo's {DEMO_VOCAB}-token vocabulary "
                         f"({tok.get_vocab_size()} tokens)")
    ids = np.array(tok.encode(text).ids, dtype=np.int64)
    config = llama_config(DEMO_VOCAB, dtype="f16", **DEMO_SHAPE)
    weights = demo_weights(bigram_log_probs(ids, DEMO_VOCAB), config, seed)
    ckpt = write_llama3_checkpoint(out_dir, weights, texts=docs, vocab_base=n_base, dtype="f16", shards=1,
                                   name=DEMO_NAME, **DEMO_SHAPE)
    saved = type(tok).from_file(str(ckpt.path / "tokenizer.json"))
    if saved.get_vocab() != tok.get_vocab():  # the weights were made for `tok`; training must be deterministic
        raise Cl3Error("the demo tokenizer was not reproduced identically")
    return ckpt


def tokenizer_documents(text: str) -> list[str]:
    """The text split into documents for BPE training, without the special-token strings."""
    specials = "|".join(re.escape(s) for s in LLAMA3_SPECIAL_TOKENS)
    return [doc for part in re.split(specials, text) for doc in part.split("\n\n") if doc.strip()]


def bigram_log_probs(ids: np.ndarray, vocab: int) -> np.ndarray:
    """log P(next | current) by interpolated Kneser-Ney smoothing, shape (vocab, vocab)."""
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
    seen = counts > 0
    continuation = seen.sum(axis=0) + 0.5
    continuation = (1 - UNIFORM_MIX) * continuation / continuation.sum() + UNIFORM_MIX / vocab
    total = counts.sum(axis=1, keepdims=True)
    backoff = DISCOUNT * seen.sum(axis=1, keepdims=True)
    probs = np.where(total > 0, (np.maximum(counts - DISCOUNT, 0) + backoff * continuation) / np.maximum(total, 1),
                     continuation)
    return np.log(probs)


def truncated_svd(a: np.ndarray, rank: int, seed: int, power_iterations: int = 3):
    """Randomized SVD (Halko et al.) with Gram-matrix orthonormalisation: ``a ≈ u @ diag(s) @ vt``."""
    rng = np.random.default_rng(seed)

    def orthonormal(y):  # Cholesky QR: few LAPACK calls on small matrices (fast even on a busy machine)
        gram = y.T @ y
        r = np.linalg.cholesky(gram + 1e-10 * np.trace(gram) * np.eye(len(gram))).T
        return y @ np.linalg.inv(r)

    y = a @ rng.standard_normal((a.shape[1], rank + 32))
    for _ in range(power_iterations):
        y = orthonormal(y)
        y = a @ (a.T @ y)
    q = orthonormal(orthonormal(y))
    b = q.T @ a
    w, vecs = np.linalg.eigh(b @ b.T)
    top = np.argsort(w)[::-1][:rank]
    s = np.sqrt(np.maximum(w[top], 0))
    return q @ vecs[:, top], s, (vecs[:, top].T @ b) / s[:, None]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def demo_weights(logp: np.ndarray, config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named Llama weights realising the factorised bigram `logp` (see the module docstring), rounded to f16."""
    rng = np.random.default_rng(seed)
    vocab, hidden, ffn = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    n_layers, n_head, n_kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // n_head
    code, factor = slice(0, CODE_DIMS), slice(CODE_DIMS, hidden)
    n_factor = hidden - CODE_DIMS
    assert ffn == vocab and n_layers >= 2 and RANK < n_factor

    # Factorised logits: logit[t, j] = u[t] · v[j].
    centred = logp - logp.mean(axis=1, keepdims=True)
    left, s, right_t = truncated_svd(centred, RANK, seed)
    u, v = left * np.sqrt(s), right_t.T * np.sqrt(s)

    # Embedding: e_t = κ b + γ c_t, c_t ⟂ b, |c_t| = 1, rms(e_t) = 1.
    b = _unit(rng.standard_normal(CODE_DIMS))
    c = rng.standard_normal((vocab, CODE_DIMS))
    c = _unit(c - np.outer(c @ b, b))
    kappa = gamma = np.sqrt(hidden / 2)
    embed = np.zeros((vocab, hidden))
    embed[:, code] = kappa * b + gamma * c

    # What token t's neurons write into the factor half. Layer 0 writes u_t plus a large random detour d_t, the
    # last layer takes the detour back out, so rounding errors in those weights reach the logits amplified, as in a
    # deep network. A filler along g gives every token the same residual norm after each layer (so RMSNorm scales
    # all tokens alike).
    g = _unit(rng.standard_normal(n_factor - RANK))
    u_scale = np.sqrt((u * u).sum(axis=1).mean())
    detour = _unit(rng.standard_normal((vocab, RANK))) * DETOUR * u_scale
    partial = [u + detour] + [u + detour] * (n_layers - 2) + [u]  # factor-half content after each layer
    norm2 = [(x * x).sum(axis=1) for x in partial]
    target = max(n.max() for n in norm2)
    write_scale = np.sqrt(hidden / target)       # |factor half| = |e_t| after every layer
    after = [np.concatenate([x, np.outer(np.sqrt(target - n), g)], axis=1) * write_scale
             for x, n in zip(partial, norm2)]
    residual_rms = [1.0] + [np.sqrt(2.0)] * n_layers  # rms of the residual at the input of each layer

    # MLP key-value memory, neuron t of every layer serving token t. With the layer input normalised to
    # x = e_t / rms: gate = α (c_i·c_t − θ), up = c_i·c_t, so neuron t fires for token t (activation silu(α (1 − θ)))
    # and the others only weakly. down_proj solves (activations @ down.T = wanted writes) for all tokens.
    spread = np.random.default_rng(seed + 7919)
    weights: dict[str, np.ndarray] = {"model.embed_tokens.weight": _f16(embed)}
    residual = weights["model.embed_tokens.weight"]  # each token alone, attention ignored
    for layer in range(n_layers):
        rms = residual_rms[layer]
        norm_w = _f16(np.exp(CHANNEL_SPREAD * spread.standard_normal(hidden)))
        gate = np.zeros((ffn, hidden))
        gate[:, code] = GATE_GAIN * rms * (c / gamma - THRESHOLD * b / kappa) / norm_w[code]
        up = np.zeros((ffn, hidden))
        up[:, code] = rms * c / gamma / norm_w[code]
        gate, up = _f16(gate), _f16(up)
        x = residual / np.sqrt((residual * residual).mean(axis=1, keepdims=True) + config["rms_norm_eps"]) * norm_w
        z = x @ gate.T
        activations = z / (1 + np.exp(-z)) * (x @ up.T)
        wanted = after[layer] - residual[:, factor]
        diagonal = np.diag(activations)[:, None]
        solution = wanted / diagonal
        solution = (wanted - (activations @ solution - diagonal * solution)) / diagonal  # one Jacobi step
        down = np.zeros((hidden, ffn))
        down[factor] = solution.T
        down = _f16(down)
        residual = residual + activations @ down.T
        p = f"model.layers.{layer}."
        weights |= {
            p + "input_layernorm.weight": np.ones(hidden),
            p + "post_attention_layernorm.weight": norm_w,
            p + "self_attn.q_proj.weight": rng.standard_normal((hidden, hidden)) / np.sqrt(hidden),
            p + "self_attn.k_proj.weight": rng.standard_normal((n_kv * head_dim, hidden)) / np.sqrt(hidden),
            p + "self_attn.v_proj.weight": rng.standard_normal((n_kv * head_dim, hidden)) / np.sqrt(hidden),
            p + "self_attn.o_proj.weight": rng.standard_normal((hidden, hidden)) * ATTENTION_GAIN / np.sqrt(hidden),
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": down,
        }

    # Output: final rms is sqrt(2), so logit_j = (v_j · u_t) when row j = sqrt(2) / write_scale · v_j.
    norm_out = np.sqrt((hidden + hidden) / hidden)
    final_w = _f16(np.exp(CHANNEL_SPREAD * spread.standard_normal(hidden)))
    output = np.zeros((vocab, hidden))
    output[:, CODE_DIMS:CODE_DIMS + RANK] = v * norm_out / write_scale / final_w[CODE_DIMS:CODE_DIMS + RANK]
    weights |= {"model.norm.weight": final_w, "lm_head.weight": output}
    return {name: _f16(w) for name, w in weights.items()}


def _f16(w: np.ndarray) -> np.ndarray:
    """Rounded to float16 (the checkpoint's dtype), as C-ordered float32: safetensors writes the raw buffer, so a
    transposed (Fortran-ordered) array would be scrambled."""
    return np.ascontiguousarray(w.astype(np.float16).astype(np.float32))
