"""One check of a LoRA adapter against its base, shared by `cl3 merge` and `cl3 convert --lora`: a damaged adapter
(A or B of the wrong size, a rank the config contradicts, a non-numeric alpha) gets the same one-line error from
both commands, and neither writes anything."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from .conftest import one_line_error, run_cl3
from .test_merge import make_adapter

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def damaged_adapter(tiny_llama3, path, case: str):
    make_adapter(path, tiny_llama3, targets=("q_proj", "v_proj"))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    config = json.loads((path / "adapter_config.json").read_text())
    rng = np.random.default_rng(1)
    if case == "a-too-wide":      # the issue's [4, 259] A for a 256-wide base
        a = tensors[Q + ".lora_A.weight"]
        tensors[Q + ".lora_A.weight"] = rng.standard_normal((a.shape[0], a.shape[1] + 3)).astype(np.float32)
    elif case == "b-wrong-rows":
        b = tensors[Q + ".lora_B.weight"]
        tensors[Q + ".lora_B.weight"] = rng.standard_normal((b.shape[0] + 4, b.shape[1])).astype(np.float32)
    elif case == "alpha-word":
        config["lora_alpha"] = "eight"
    elif case == "alpha-pattern-word":
        config["alpha_pattern"] = {"q_proj": "high"}
    elif case == "rank-contradicted":
        config["r"] = 8
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


CASES = {"a-too-wide": "makes a [256, 259] update but the base weight is [256, 256]",
         "b-wrong-rows": "makes a [260, 256] update but the base weight is [256, 256]",
         "alpha-word": 'lora_alpha must be a positive number, not "eight"',
         "alpha-pattern-word": "alpha_pattern must map module names to positive numbers",
         "rank-contradicted": "gives model.layers.0.self_attn.q_proj rank 8, but its LoRA matrices have rank 4"}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_convert_lora_refuse_the_same_adapter_with_the_same_line(tiny_llama3, tiny_llama3_gguf, tmp_path,
                                                                           case):
    adapter = damaged_adapter(tiny_llama3, tmp_path / "lora", case)
    merged = one_line_error(run_cl3("merge", tiny_llama3.path, adapter, "-o", tmp_path / "merged", "-q"), CASES[case])
    lora = one_line_error(run_cl3("convert", tiny_llama3.path, "--lora", adapter, "-o", tmp_path / "a.gguf", "-q"),
                          CASES[case])
    assert merged == lora
    from_gguf = one_line_error(run_cl3("convert", tiny_llama3_gguf, "--lora", adapter, "-o", tmp_path / "b.gguf",
                                       "-q"), CASES[case])
    assert from_gguf == lora
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # nothing written, no partial left
