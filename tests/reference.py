"""Independent numpy reference for the Llama architecture (HF conventions: rotate-half rotary, GQA, RMSNorm, SwiGLU).

Written from the architecture definition, it shares no code with cl3; tests compare llama.cpp's logits against it.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotary(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """HF `apply_rotary_pos_emb` with `rotate_half`: x is (heads, seq, head_dim)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    emb = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + rotated * sin


def llama_logits(weights: dict[str, np.ndarray], config: dict, tokens: list[int],
                 inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Logits (seq, vocab) of a causal Llama forward pass over `tokens`, in float64.

    With `inputs`, also records the input rows of every layer weight's matrix multiplication, keyed by HF name.
    """
    record = inputs if inputs is not None else {}
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    hidden = config["hidden_size"]
    d = config.get("head_dim", hidden // n_head)
    eps, theta = config["rms_norm_eps"], config.get("rope_theta", 10000.0)
    seq = len(tokens)
    pos = np.arange(seq)
    x = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((seq, seq), -np.inf), k=1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        for proj in ("q_proj", "k_proj", "v_proj"):
            record[p + f"self_attn.{proj}.weight"] = h
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(seq, n_head, d).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(seq, n_kv, d).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(seq, n_kv, d).transpose(1, 0, 2)
        q, k = rotary(q, pos, theta), rotary(k, pos, theta)
        k, v = np.repeat(k, n_head // n_kv, axis=0), np.repeat(v, n_head // n_kv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = ((scores / scores.sum(axis=-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(seq, n_head * d)
        record[p + "self_attn.o_proj.weight"] = attn
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        record[p + "mlp.gate_proj.weight"] = record[p + "mlp.up_proj.weight"] = h
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        act = (gate / (1 + np.exp(-gate))) * up
        record[p + "mlp.down_proj.weight"] = act
        x = x + act @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T
