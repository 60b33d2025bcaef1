"""cl3 merge: peak RSS against the largest tensor, the adapter and the whole model, plus wall time vs a plain copy.

Builds a random bf16 Llama checkpoint (default: Llama-3.2-1B-like layers, a 128,256-token vocabulary, 4 layers so it
builds fast) and a rank-64 LoRA adapter on every linear layer plus a full lm_head replacement, then runs `cl3 merge`
in a subprocess and reads its peak RSS. The goal (issue 7): peak RSS bounded by the largest tensor plus the adapter.

    python benchmarks/bench_merge.py [--workdir DIR] [--layers N] [--rank R]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 (puts the repository on sys.path for tests.tiny)
import ml_dtypes
import numpy as np

SHAPE = {"hidden": 2048, "heads": 32, "kv_heads": 8, "ffn": 8192}
VOCAB = 128256


def build(work: Path, layers: int, rank: int) -> tuple[Path, Path]:
    from safetensors.numpy import save_file

    from tests.tiny import llama_config

    base, lora = work / "base", work / "lora"
    if (lora / "adapter_config.json").exists():
        return base, lora
    base.mkdir(parents=True, exist_ok=True)
    lora.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    config = llama_config(VOCAB, layers=layers, bos=0, eos=1, **SHAPE)
    (base / "config.json").write_text(json.dumps(config))
    h, f, d = SHAPE["hidden"], SHAPE["ffn"], SHAPE["hidden"] // SHAPE["heads"]
    shapes = {"q_proj": (h, h), "k_proj": (SHAPE["kv_heads"] * d, h), "v_proj": (SHAPE["kv_heads"] * d, h),
              "o_proj": (h, h), "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}

    def rand(shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)

    save_file({"model.embed_tokens.weight": rand((VOCAB, h)), "model.norm.weight": rand((h,))},
              str(base / "model-00001.safetensors"))
    adapter = {}
    for i in range(layers):
        part = {}
        for mod, shape in shapes.items():
            group = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{i}.{group}.{mod}"
            part[name + ".weight"] = rand(shape)
            adapter[f"base_model.model.{name}.lora_A.weight"] = rng.standard_normal((rank, shape[1]), np.float32)
            adapter[f"base_model.model.{name}.lora_B.weight"] = rng.standard_normal((shape[0], rank), np.float32)
        part |= {f"model.layers.{i}.input_layernorm.weight": rand((h,)),
                 f"model.layers.{i}.post_attention_layernorm.weight": rand((h,))}
        save_file(part, str(base / f"model-{i + 2:05d}.safetensors"))
    save_file({"lm_head.weight": rand((VOCAB, h))}, str(base / f"model-{layers + 2:05d}.safetensors"))
    adapter["base_model.model.lm_head.weight"] = rand((VOCAB, h))
    save_file(adapter, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(shapes),
        "modules_to_save": ["lm_head"], "bias": "none"}))
    return base, lora


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a child process. A small wrapper process reads the child's ru_maxrss: read
    here, it would include this (large) process's image, which the child has right after fork."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    return time.perf_counter() - t, int(res.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cl3-bench-merge")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args()
    base, lora = build(args.workdir, args.layers, args.rank)
    out = args.workdir / "merged"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(args.workdir / "copy", ignore_errors=True)
    _, rss_import = run([sys.executable, "-c", "import cl3.merge, cl3.cli"])
    t_copy, _ = run(["cp", "-r", str(base), str(args.workdir / "copy")])
    t_merge, rss = run([sys.executable, "-m", "cl3", "merge", str(base), str(lora), "-o", str(out), "-q"])
    mib = 1024**2
    model = sum(p.stat().st_size for p in base.glob("*.safetensors")) / mib
    adapter = (lora / "adapter_model.safetensors").stat().st_size / mib
    largest = VOCAB * SHAPE["hidden"] * 2 / mib
    print(f"{'':28}{'MiB':>10}")
    print(f"{'model (bf16)':28}{model:10.0f}")
    print(f"{'largest tensor (bf16)':28}{largest:10.0f}")
    print(f"{'adapter':28}{adapter:10.0f}")
    print(f"{'python + imports alone':28}{rss_import:10.0f}")
    print(f"{'cl3 merge peak RSS':28}{rss:10.0f}   target ≤ largest + adapter + imports = "
          f"{largest + adapter + rss_import:.0f}")
    print(f"wall: merge {t_merge:.1f} s, plain copy {t_copy:.1f} s ({t_merge / max(t_copy, 1e-9):.1f}×)")


if __name__ == "__main__":
    main()
