"""Rope settings in every config.json layout transformers has written, against transformers' own logits.

Each case writes one config.json over the same tiny checkpoint (random float32 weights in real safetensors, a real
tokenizer), converts it with cl3 to F32 and compares llama.cpp's logits over a few hundred tokens with those of
transformers' LlamaForCausalLM / MistralForCausalLM (torch, CPU, float32) loaded from the same directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_cpp import Llama

from cl3.convert import convert
from cl3.plan import write_weightless_gguf

from .conftest import one_line_error, run_cl3

TOLERANCE = 1e-3   # max |llama.cpp - transformers| / max |transformers|, as the numpy-reference logits tests
N_TOKENS = 300
LEGACY_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")

LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
YARN = {"factor": 4.0, "original_max_position_embeddings": 64}

# name: (config keys, tokens). Every case sets its own rope keys and context; the tiny model's head_dim is 32.
CASES = {
    # transformers 4 and earlier: top-level rope_theta, rope_scaling with `type` (older) or `rope_type`
    "legacy no rope_theta": ({}, N_TOKENS),
    "legacy rope_theta": ({"rope_theta": 500000.0}, N_TOKENS),
    "legacy linear, type": ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}, N_TOKENS),
    "legacy linear, rope_type": ({"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                                 N_TOKENS),
    "legacy yarn, type": ({"rope_theta": 10000.0, "max_position_embeddings": 256,
                           "rope_scaling": {"type": "yarn"} | YARN}, N_TOKENS),
    "legacy llama3": ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3"} | LLAMA3}, N_TOKENS),
    "legacy dynamic, type": ({"rope_theta": 10000.0, "max_position_embeddings": 128,
                              "rope_scaling": {"type": "dynamic", "factor": 4.0}}, 224),
    # transformers 5: everything in rope_parameters
    "rope_parameters default": ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, N_TOKENS),
    "rope_parameters, top-level rope_theta": ({"rope_theta": 500000.0, "rope_parameters": {"rope_type": "default"}},
                                              N_TOKENS),
    "rope_parameters linear": ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}},
                               N_TOKENS),
    "rope_parameters yarn": ({"max_position_embeddings": 256, "rope_parameters": {
        "rope_theta": 10000.0, "rope_type": "yarn", "beta_fast": 32.0, "beta_slow": 1.0} | YARN}, N_TOKENS),
    "rope_parameters yarn, attention_factor": ({"max_position_embeddings": 256, "rope_parameters": {
        "rope_theta": 10000.0, "rope_type": "yarn", "attention_factor": 1.25} | YARN}, N_TOKENS),
    "rope_parameters yarn, mscale": ({"max_position_embeddings": 256, "rope_parameters": {
        "rope_theta": 10000.0, "rope_type": "yarn", "mscale": 1.0, "mscale_all_dim": 0.5} | YARN}, N_TOKENS),
    "rope_parameters llama3": ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3"} | LLAMA3},
                               N_TOKENS),
    "rope_parameters dynamic": ({"max_position_embeddings": 128, "rope_parameters": {
        "rope_theta": 10000.0, "rope_type": "dynamic", "factor": 4.0}}, 224),
    "Mistral rope_parameters": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                 "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}, N_TOKENS),
}


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    from .tiny import build_llama3_checkpoint

    return build_llama3_checkpoint(tmp_path_factory.mktemp("rope") / "hf", texts=["rope 旋转位置编码 theta"] * 20,
                                   vocab_base=300, dtype="f32", shards=1, hidden=128, heads=4, kv_heads=2, ffn=256,
                                   context=512)


def with_config(tiny, out: Path, keys: dict) -> Path:
    """A copy of the tiny checkpoint whose config.json has exactly the rope keys in `keys`."""
    shutil.copytree(tiny.path, out)
    config = {k: v for k, v in tiny.config.items() if k not in LEGACY_KEYS} | {"max_position_embeddings": 512} | keys
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def transformers_logits(path: Path, tokens: list[int]) -> np.ndarray:
    # imported here, not at collection: importing transformers freezes huggingface_hub's cache location for every
    # test module, before test_hub points HF_HOME at a temporary directory
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    assert type(model).__name__ == json.loads((path / "config.json").read_text())["architectures"][0]
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = Llama(str(path), n_ctx=512, n_batch=512, n_ubatch=512, verbose=False, logits_all=True, seed=0,
                type_k=0, type_v=0, flash_attn=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def sample_tokens(tiny, n: int) -> list[int]:
    rng = np.random.default_rng(n)
    return [tiny.config["bos_token_id"]] + rng.integers(0, tiny.config["vocab_size"], n - 1).tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tiny_f32, tmp_path):
    """llama.cpp on cl3's GGUF computes what transformers computes from the same config.json.

    `dynamic` differs by definition: transformers rescales the base for the length of the sequence it is given
    (base·(factor·len/ctx − factor + 1)^(d/(d−2)), no change up to ctx), llama.cpp has no run-time rescaling and cl3
    writes the base at the full factor (base·factor^(d/(d−2))). The two agree at len = ctx·(2·factor − 1)/factor,
    224 tokens for ctx 128 and factor 4, and the dynamic cases are compared at exactly that length only.
    """
    keys, n = CASES[name]
    src = with_config(tiny_f32, tmp_path / "hf", keys)
    tokens = sample_tokens(tiny_f32, n)
    expected = transformers_logits(src, tokens)
    gguf_path = convert(src, tmp_path / "m.gguf", "f32").path
    assert relative_difference(llama_cpp_logits(gguf_path, tokens), expected) < TOLERANCE
    if keys:  # the rope settings matter: plain rope (theta 10000) gives other logits
        plain = with_config(tiny_f32, tmp_path / "plain", {"architectures": keys.get("architectures", ["LlamaForCausalLM"]),
                                                            "model_type": keys.get("model_type", "llama")})
        assert relative_difference(transformers_logits(plain, tokens), expected) > 30 * TOLERANCE


def test_config_resaved_by_transformers_5(tiny_f32, tmp_path):
    """A legacy config (rope_theta + rope_scaling with `type`) loaded and saved again by transformers 5 holds only
    rope_parameters (with both `type` and `rope_type`); it converts to the same model."""
    from transformers import AutoConfig

    src = with_config(tiny_f32, tmp_path / "hf", {"rope_theta": 500000.0, "max_position_embeddings": 256,
                                                  "rope_scaling": {"type": "yarn"} | YARN})
    AutoConfig.from_pretrained(src).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    assert "rope_scaling" not in config and "rope_theta" not in config
    assert config["rope_parameters"]["rope_theta"] == 500000.0 and config["rope_parameters"]["type"] == "yarn"
    tokens = sample_tokens(tiny_f32, N_TOKENS)
    gguf_path = convert(src, tmp_path / "m.gguf", "f32").path
    assert relative_difference(llama_cpp_logits(gguf_path, tokens), transformers_logits(src, tokens)) < TOLERANCE


def rope_metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if ".rope." in k}
    freqs = [t.shape.tolist() for t in reader.tensors if t.name == "rope_freqs.weight"]
    return fields | {"rope_freqs": freqs}


@pytest.mark.parametrize("name", ["rope_parameters llama3", "rope_parameters yarn, attention_factor",
                                  "rope_parameters dynamic"])
def test_plan_writes_the_rope_settings_convert_writes(name, tiny_f32, tmp_path):
    src = with_config(tiny_f32, tmp_path / "hf", CASES[name][0])
    converted = rope_metadata(convert(src, tmp_path / "m.gguf", "f16").path)
    write_weightless_gguf(json.loads((src / "config.json").read_text()), tmp_path / "plan.gguf")
    assert rope_metadata(tmp_path / "plan.gguf") == converted
    assert converted["llama.rope.freq_base"] != 10000.0 or "llama.rope.scaling.type" in converted


@pytest.mark.parametrize("keys,message", [
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "longrope", "short_factor": [1.0] * 16,
                          "long_factor": [2.0] * 16, "original_max_position_embeddings": 64}}, "rope type 'longrope'"),
    ({"rope_scaling": {"type": "su", "factor": 2.0}}, "rope type 'su'"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 10000.0, "rope_type": "default"},
                          "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}}, "per-layer rope"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}}, "and they differ"),
    ({"rope_scaling": "linear"}, "rope_scaling is not an object"),
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear"}}, "lack factor"),
    ({"rope_parameters": {"rope_theta": "500000", "rope_type": "default"}}, "rope_theta must be a positive number"),
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "beta_fast": 16} | YARN}, "beta_fast"),
])
def test_unsupported_rope_is_one_line_error(keys, message, tiny_f32, tmp_path):
    src = with_config(tiny_f32, tmp_path / "hf", keys)
    one_line_error(run_cl3("convert", src, "-o", tmp_path / "m.gguf", "-q"), message)
    assert not (tmp_path / "m.gguf").exists()
    one_line_error(run_cl3("plan", src), message)
