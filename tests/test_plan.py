"""`cl3 plan` against the authors' published Size/BPW rows and against real quantized files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import pytest

from cl3 import plan
from cl3.bench import AUTHORS_TYPES, read_table_csv
from cl3.quantize import quantize

from .conftest import one_line_error, run_cl3

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = read_table_csv(REPO / "quant_tables" / "llama-3-chinese-8b.published.csv")

LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
}


@pytest.fixture(scope="module")
def llama3_8b_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama3-8b-config")
    (d / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    return d


def llama3_vocab_gguf() -> Path | None:
    """Llama-3's real tokenizer as llama.cpp ships it (models/ggml-vocab-llama-bpe.gguf in its source tree)."""
    candidates = []
    if src := os.environ.get("CL3_REFERENCE_SRC"):
        candidates.append(Path(src))
    if bin_dir := os.environ.get("CL3_REFERENCE_BIN"):
        candidates.append(Path(bin_dir).parents[1] / "src")
    candidates.append(Path.home() / ".cache" / "cl3-reference" / "0.3.36" / "src")
    for c in candidates:
        if (c / "models" / "ggml-vocab-llama-bpe.gguf").is_file():
            return c / "models" / "ggml-vocab-llama-bpe.gguf"
    return None


def test_llama3_8b_bpw_row_is_reproduced(llama3_8b_dir):
    plans = plan.plan(llama3_8b_dir, AUTHORS_TYPES, ctx=None)
    assert [p.type for p in plans] == AUTHORS_TYPES
    assert [f"{p.bpw:.2f}" for p in plans] == [f"{PUBLISHED['bpw'][t]:.2f}" for t in AUTHORS_TYPES]
    assert all(p.n_params == 8_030_261_248 for p in plans)  # Llama-3-8B's parameter count
    for p in plans:  # without tokenizer metadata the file is a few MB (~0.007 GiB) short of the published size
        assert PUBLISHED["size_gib"][p.type] - 0.015 < p.size_gib < PUBLISHED["size_gib"][p.type]
        assert not p.tokenizer


@pytest.mark.slow
def test_llama3_8b_size_row_is_reproduced_with_the_real_tokenizer(llama3_8b_dir):
    vocab = llama3_vocab_gguf()
    if vocab is None:
        pytest.skip("Llama-3's vocabulary (llama.cpp's models/ggml-vocab-llama-bpe.gguf) is not available; "
                    "set CL3_REFERENCE_SRC to a llama.cpp source tree")
    plans = plan.plan(llama3_8b_dir, AUTHORS_TYPES, ctx=8192, vocab_gguf=vocab)
    assert [f"{p.size_gib:.2f}" for p in plans] == [f"{PUBLISHED['size_gib'][t]:.2f}" for t in AUTHORS_TYPES]
    assert [f"{p.bpw:.2f}" for p in plans] == [f"{PUBLISHED['bpw'][t]:.2f}" for t in AUTHORS_TYPES]
    kv_cache = 2 * 32 * 8192 * 8 * 128 * 2  # K and V, f16: 1 GiB at 8K context
    for p in plans:
        assert p.memory_bytes > p.tensor_bytes + kv_cache


def gguf_tensor_bytes(path: Path) -> tuple[int, dict[str, int]]:
    reader = gguf.GGUFReader(path)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name.lower()] = counts.get(t.tensor_type.name.lower(), 0) + 1
    return sum(int(t.n_bytes) for t in reader.tensors), counts


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q3_K", "Q2_K"])
def test_plan_matches_a_real_quantization(type_name, tiny_llama3_dir, tiny_llama3_gguf_f16, tmp_path):
    [p] = plan.plan(tiny_llama3_dir, [type_name], ctx=512)
    out = tmp_path / f"tiny-{type_name}.gguf"
    quantize(tiny_llama3_gguf_f16, [type_name], out=out)
    tensor_bytes, counts = gguf_tensor_bytes(out)
    assert p.tensor_bytes == tensor_bytes
    assert {k.lower(): v for k, v in p.tensor_types.items()} == counts
    # the file differs only by descriptive metadata (name, size label) that the real conversion adds
    assert abs(p.size_bytes - out.stat().st_size) < 2048
    assert p.tokenizer
    kv_cache = 2 * 2 * 512 * 2 * 64 * 2  # K and V, 2 layers, 2 kv heads of 64, f16
    assert p.memory_bytes >= p.tensor_bytes + kv_cache


def test_cli_plan_json(tiny_llama3_dir):
    proc = run_cl3("plan", tiny_llama3_dir, "--types", "Q8_0,Q4_K", "--json", "-c", "256")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["type"] for r in rows] == ["Q8_0", "Q4_K"]
    assert {"type", "size_gib", "bpw", "memory_gib"} <= rows[0].keys()
    assert rows[0]["bpw"] > rows[1]["bpw"]


@pytest.mark.parametrize("args, message", [
    (["plan", "/no/such/dir"], "not a model directory"),
    (["plan", "{dir}", "--types", "Q9_9"], "unknown quantization type"),
    (["plan", "{bad}"], "config.json is not valid JSON"),
])
def test_cli_plan_bad_input_is_one_line(args, message, tiny_llama3_dir, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    proc = run_cl3(*[a.format(dir=tiny_llama3_dir, bad=bad) for a in args])
    one_line_error(proc, message)
