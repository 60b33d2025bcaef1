"""cl3 merge / LoRA GGUF: a tiny PEFT-format adapter built here with numpy, merged, converted, run in llama.cpp.

The expected merged weights are computed in this file from W + scale·B·A (PEFT's definition), independently of
cl3.merge; llama.cpp's logits are compared against the numpy forward pass (tests/reference.py) of those weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from llama_cpp import Llama
from safetensors.numpy import load_file, save_file

from cl3.convert import convert
from cl3.errors import Cl3Error
from cl3.merge import export_lora_gguf, merge

from .conftest import run_cl3
from .reference import llama_logits

LINEAR = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def bf16(w: np.ndarray) -> np.ndarray:
    return w.astype(ml_dtypes.bfloat16).astype(np.float32)


def make_adapter(out: Path, base, *, rank: int = 4, alpha: float = 16.0, targets=("q_proj", "k_proj", "v_proj",
                 "o_proj", "gate_proj", "up_proj", "down_proj"), rslora: bool = False, alpha_pattern: dict | None = None,
                 full: dict[str, np.ndarray] | None = None, seed: int = 7, **config_extra) -> dict[str, np.ndarray]:
    """Write a PEFT LoRA adapter directory; return the expected merged weights (float32, unrounded)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    tensors, expected = {}, dict(base.weights)
    for i in range(base.config["num_hidden_layers"]):
        for mod in targets:
            module = f"model.layers.{i}.{LINEAR[mod]}.{mod}"
            w = base.weights[module + ".weight"]
            a = (rng.standard_normal((rank, w.shape[1])) / np.sqrt(w.shape[1])).astype(np.float32)
            b = (rng.standard_normal((w.shape[0], rank)) * 0.05).astype(np.float32)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            a_ = (alpha_pattern or {}).get(mod, alpha)
            scale = a_ / np.sqrt(rank) if rslora else a_ / rank
            expected[module + ".weight"] = (w.astype(np.float64) + scale * (b.astype(np.float64) @ a)).astype(np.float32)
    for name, w in (full or {}).items():
        tensors["base_model.model." + name] = w
        expected[name] = w
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.05,
              "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": rslora,
              "modules_to_save": [n.split(".")[-2] for n in full] if full else None,
              "base_model_name_or_path": "tiny/base", "rank_pattern": {}, "alpha_pattern": alpha_pattern or {}}
    (out / "adapter_config.json").write_text(json.dumps(config | config_extra))
    return expected


def llama_cpp_logits(model: Path, tokens: list[int], **kw) -> np.ndarray:
    llm = Llama(str(model), n_ctx=64, n_batch=64, verbose=False, logits_all=True, seed=0, type_k=0, type_v=0,
                flash_attn=False, **kw)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def merged_tensors(path: Path) -> dict[str, np.ndarray]:
    """The merged directory's tensors, read with the safetensors library (not with cl3's reader)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out |= {k: v.astype(np.float32) for k, v in load_file(str(path / f)).items()}
    assert set(out) == set(index["weight_map"])
    return out


def tokens_for(config: dict) -> list[int]:
    return [config["bos_token_id"]] + list(range(5, 60, 4))


# --- merge → convert → llama.cpp --------------------------------------------------------------------------------

def test_merged_model_computes_the_expected_weights_logits(tiny_llama3, tmp_path):
    expected = make_adapter(tmp_path / "lora", tiny_llama3)
    result = merge(tiny_llama3.path, tmp_path / "lora", tmp_path / "merged")
    assert (result.n_merged, result.n_replaced, result.dtype) == (14, 0, "bf16")
    # the output mirrors the base's sharding and is readable by the safetensors library
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == \
        sorted(p.name for p in tiny_llama3.path.glob("*.safetensors"))
    merged = merged_tensors(tmp_path / "merged")
    for name, w in expected.items():
        np.testing.assert_allclose(merged[name], bf16(w), rtol=1e-2, atol=1e-6, err_msg=name)
    assert np.abs(merged["model.layers.0.self_attn.q_proj.weight"]
                  - tiny_llama3.weights["model.layers.0.self_attn.q_proj.weight"]).max() > 1e-2  # the update is real

    gguf_path = convert(tmp_path / "merged", tmp_path / "merged.gguf", "f32").path
    tokens = tokens_for(tiny_llama3.config)
    reference = llama_logits({k: bf16(v) for k, v in expected.items()}, tiny_llama3.config, tokens)
    assert rel_err(llama_cpp_logits(gguf_path, tokens), reference) < 1e-3
    # and it is not simply the base model
    assert rel_err(llama_logits(tiny_llama3.weights, tiny_llama3.config, tokens), reference) > 1e-2


def test_rslora_alpha_pattern_and_fan_in_fan_out(tiny_llama3, tmp_path):
    """rsLoRA scales by alpha/√r; alpha_pattern overrides alpha per module; fan_in_fan_out is a no-op on nn.Linear
    (PEFT switches it off for Linear layers, which is all Llama has)."""
    expected = make_adapter(tmp_path / "lora", tiny_llama3, rank=8, alpha=4.0, rslora=True, targets=("q_proj", "down_proj"),
                            alpha_pattern={"down_proj": 32.0}, fan_in_fan_out=True)
    merge(tiny_llama3.path, tmp_path / "lora", tmp_path / "merged", dtype="f32")
    merged = merged_tensors(tmp_path / "merged")
    for name, w in expected.items():
        np.testing.assert_allclose(merged[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "float32"


def test_lora_on_the_embedding(tiny_llama3, tmp_path):
    """PEFT's Embedding LoRA (lora_embedding_A (r, vocab), lora_embedding_B (hidden, r)): ΔW = scale·(B·A)ᵀ."""
    lora = tmp_path / "lora"
    expected = make_adapter(lora, tiny_llama3, targets=("q_proj",), alpha=6.0, rank=3)
    vocab, hidden = tiny_llama3.weights["model.embed_tokens.weight"].shape
    rng = np.random.default_rng(11)
    a = rng.standard_normal((3, vocab)).astype(np.float32)
    b = rng.standard_normal((hidden, 3)).astype(np.float32)
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    tensors |= {"base_model.model.model.embed_tokens.lora_embedding_A": a,
                "base_model.model.model.embed_tokens.lora_embedding_B": b}
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    config = json.loads((lora / "adapter_config.json").read_text())
    config["target_modules"] = r"model\.(embed_tokens|layers\.\d+\.self_attn\.q_proj)"  # PEFT's regex form
    (lora / "adapter_config.json").write_text(json.dumps(config))
    expected["model.embed_tokens.weight"] = tiny_llama3.weights["model.embed_tokens.weight"] + 2.0 * (b @ a).T
    merge(tiny_llama3.path, lora, tmp_path / "merged", dtype="f32")
    merged = merged_tensors(tmp_path / "merged")
    for name, w in expected.items():
        np.testing.assert_allclose(merged[name], w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_full_embedding_and_head_with_a_larger_vocabulary(tiny_llama3, tmp_path):
    """'LoRA + full emb/lm-head' with extra tokens: vocab_size follows, the adapter's tokenizer wins."""
    from tokenizers import Tokenizer

    lora = tmp_path / "lora"
    tok = Tokenizer.from_file(str(tiny_llama3.path / "tokenizer.json"))
    n_base = tiny_llama3.config["vocab_size"]
    assert tok.add_tokens(["量化模型", "大语言模型", "本地部署", "中文对话"]) == 4
    lora.mkdir()
    tok.save(str(lora / "tokenizer.json"))
    shutil.copy(tiny_llama3.path / "tokenizer_config.json", lora / "tokenizer_config.json")
    vocab = tok.get_vocab_size()
    assert vocab == n_base + 4
    rng = np.random.default_rng(3)
    hidden = tiny_llama3.config["hidden_size"]
    full = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
            "lm_head.weight": (rng.standard_normal((vocab, hidden)) / np.sqrt(hidden)).astype(np.float32)}
    expected = make_adapter(lora, tiny_llama3, targets=("v_proj", "up_proj"), full=full)

    result = merge(tiny_llama3.path, lora, tmp_path / "merged")
    assert (result.vocab_size, result.n_replaced) == (vocab, 2)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == vocab
    gguf_path = convert(tmp_path / "merged", tmp_path / "merged.gguf", "f32").path

    llm = Llama(str(gguf_path), n_ctx=64, verbose=False, vocab_only=True)
    assert llm.n_vocab() == vocab
    assert llm.tokenize("本地部署".encode(), add_bos=False) == [tok.token_to_id("本地部署")] == [n_base + 2]
    tokens = tokens_for(tiny_llama3.config) + [n_base + 1, n_base + 3]
    reference = llama_logits({k: bf16(v) for k, v in expected.items()}, config, tokens)
    actual = llama_cpp_logits(gguf_path, tokens)
    assert actual.shape == reference.shape == (len(tokens), vocab)
    assert rel_err(actual, reference) < 1e-3


# --- llama.cpp LoRA adapter (GGUF) -------------------------------------------------------------------------------

def test_lora_gguf_applied_by_llama_cpp_matches_the_merged_reference(tiny_llama3, tiny_llama3_gguf, tmp_path):
    expected = make_adapter(tmp_path / "lora", tiny_llama3, rank=8, alpha=16.0, rslora=True,
                            alpha_pattern={"o_proj": 4.0})
    result = export_lora_gguf(tmp_path / "lora", tiny_llama3.path, tmp_path / "lora.gguf")
    assert (result.n_pairs, result.alpha) == (14, 16.0)

    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.1.ffn_down.weight.lora_b"} <= names

    tokens = tokens_for(tiny_llama3.config)
    reference = llama_logits(expected, tiny_llama3.config, tokens)
    with_lora = llama_cpp_logits(tiny_llama3_gguf, tokens, lora_path=str(tmp_path / "lora.gguf"))
    assert rel_err(with_lora, reference) < 1e-3
    assert rel_err(llama_cpp_logits(tiny_llama3_gguf, tokens), reference) > 1e-2


def test_lora_gguf_from_a_gguf_base_equals_the_one_from_the_hf_base(tiny_llama3, tiny_llama3_gguf, tmp_path):
    make_adapter(tmp_path / "lora", tiny_llama3, targets=("q_proj", "k_proj"))
    export_lora_gguf(tmp_path / "lora", tiny_llama3.path, tmp_path / "a.gguf")
    (tmp_path / "out").mkdir()
    b_path = export_lora_gguf(tmp_path / "lora", tiny_llama3_gguf, tmp_path / "out", outtype="f16").path
    assert b_path == tmp_path / "out" / "lora-LoRA-F16.gguf"
    a = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    b = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(b_path).tensors}
    assert a.keys() == b.keys()
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, rtol=2e-3, atol=1e-4)


def test_lora_gguf_refuses_full_replacements(tiny_llama3, tmp_path):
    hidden, vocab = tiny_llama3.config["hidden_size"], tiny_llama3.config["vocab_size"]
    make_adapter(tmp_path / "lora", tiny_llama3, targets=("q_proj",),
                 full={"lm_head.weight": np.zeros((vocab, hidden), np.float32)})
    with pytest.raises(Cl3Error, match="cl3 merge"):
        export_lora_gguf(tmp_path / "lora", tiny_llama3.path, tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()


# --- bad input: one-line error, nothing left ----------------------------------------------------------------------

def _bad_adapters(tiny_llama3, root: Path) -> dict[str, tuple[Path, str]]:
    cases = {}
    ia3 = root / "ia3"
    make_adapter(ia3, tiny_llama3, targets=("q_proj",))
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    cases["ia3"] = (ia3, "PEFT type 'IA3' is not supported")

    other = root / "other-size"
    other_base = type(tiny_llama3)(tiny_llama3.path, dict(tiny_llama3.config),
                                   {k: np.zeros(v.shape[:-1] + (v.shape[-1] * 2,), np.float32) if v.ndim == 2 else v
                                    for k, v in tiny_llama3.weights.items()})
    make_adapter(other, other_base, targets=("q_proj",))
    cases["other-size"] = (other, "adapter for another model size")

    deeper = root / "deeper"
    make_adapter(deeper, tiny_llama3, targets=("q_proj",))
    t = load_file(str(deeper / "adapter_model.safetensors"))
    t = {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}
    save_file(t, str(deeper / "adapter_model.safetensors"))
    cases["deeper"] = (deeper, "does not have")

    missing = root / "missing"
    make_adapter(missing, tiny_llama3, targets=("q_proj",))
    (missing / "adapter_model.safetensors").unlink()
    cases["missing"] = (missing, "no adapter weights")

    pickle = root / "pickle"
    make_adapter(pickle, tiny_llama3, targets=("q_proj",))
    (pickle / "adapter_model.safetensors").rename(pickle / "adapter_model.bin")
    cases["pickle"] = (pickle, "allow pickles")

    no_config = root / "no-config"
    make_adapter(no_config, tiny_llama3, targets=("q_proj",))
    (no_config / "adapter_config.json").unlink()
    cases["no-config"] = (no_config, "adapter_config.json not found")
    return cases


def test_bad_adapters_give_one_line_errors_and_leave_nothing(tiny_llama3, tmp_path):
    cases = _bad_adapters(tiny_llama3, tmp_path / "adapters")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for case, (adapter, message) in cases.items():
        with pytest.raises(Cl3Error) as info:
            merge(tiny_llama3.path, adapter, outputs / case)
        assert message in str(info.value) and "\n" not in str(info.value), (case, str(info.value))
    for case in ("ia3", "other-size", "pickle"):  # and through the real command line, which names the flag
        r = run_cl3("merge", tiny_llama3.path, cases[case][0], "-o", outputs / case)
        assert r.returncode != 0, case
        assert r.stderr.startswith("error:") and cases[case][1] in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert case != "pickle" or "(see --allow-pickle)" in r.stderr, r.stderr
    assert list(outputs.iterdir()) == []  # no output, no .partial leftovers


def test_failure_while_writing_leaves_nothing(tiny_llama3, tmp_path, monkeypatch):
    import cl3.merge

    make_adapter(tmp_path / "lora", tiny_llama3, targets=("q_proj",))
    calls = []

    def interrupted(self, rows):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, rows)

    original = cl3.merge._SafetensorsStream.write
    monkeypatch.setattr(cl3.merge._SafetensorsStream, "write", interrupted)
    with pytest.raises(Cl3Error, match="output directory does not exist"):
        merge(tiny_llama3.path, tmp_path / "lora", tmp_path / "out" / "merged")
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        merge(tiny_llama3.path, tmp_path / "lora", tmp_path / "out" / "merged")
    assert len(calls) == 5 and list((tmp_path / "out").iterdir()) == []  # interrupted mid-shard: nothing left


def test_pickle_adapter_with_allow_pickle_says_it_needs_torch(tiny_llama3, tmp_path):
    adapter, _ = _bad_adapters(tiny_llama3, tmp_path / "adapters")["pickle"]
    with pytest.raises(Cl3Error, match="needs PyTorch"):
        merge(tiny_llama3.path, adapter, tmp_path / "out", allow_pickle=True)
    assert not (tmp_path / "out").exists()


def test_cli_merge_then_convert(tiny_llama3, tmp_path):
    expected = make_adapter(tmp_path / "lora", tiny_llama3, targets=("k_proj", "gate_proj"), alpha=8.0)
    r = run_cl3("merge", tiny_llama3.path, tmp_path / "lora", "-o", tmp_path / "merged", "--dtype", "f16", "-q")
    assert r.returncode == 0, r.stderr
    assert "merged" in r.stdout
    r = run_cl3("convert", tmp_path / "merged", "-o", tmp_path / "m.gguf", "--outtype", "f32", "-q")
    assert r.returncode == 0, r.stderr
    f16 = {k: v.astype(np.float16).astype(np.float32) for k, v in expected.items()}
    tokens = tokens_for(tiny_llama3.config)
    assert rel_err(llama_cpp_logits(tmp_path / "m.gguf", tokens), llama_logits(f16, tiny_llama3.config, tokens)) < 1e-3
    # an existing, non-empty output directory is not overwritten
    r = run_cl3("merge", tiny_llama3.path, tmp_path / "lora", "-o", tmp_path / "merged")
    assert r.returncode != 0 and "already exists" in r.stderr
