"""cl3 convert vs llama.cpp's convert_hf_to_gguf.py on a Llama-3.2-1B-shaped random bf16 checkpoint.

Prints wall time and peak RSS of both, side by side with a plain copy of the same bytes (the floor), the ratios
against the targets (≤ 0.5× the reference's time, ≤ 0.25× its peak RSS, ≤ 1.5× the copy), and whether the f16
tensor data of both outputs is identical.

    python benchmarks/bench_convert.py [--workdir DIR] [--reference-prefix ~/.cache/cl3-reference/0.3.36]

The reference needs `WITH_CONVERT=1 bash benchmarks/build-llama-cpp-tools.sh` (a venv with torch + transformers).
The checkpoint uses a SentencePiece tokenizer padded to 128,256 tokens: convert_hf_to_gguf.py refuses byte-level BPE
tokenizers it does not know by hash, and the tokenizer is not what is being timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import common  # noqa: F401 (puts the repository on sys.path for tests.tiny)
import gguf
import numpy as np

SHAPE = dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, context=131072, rope_theta=500000.0, tie=True)
VOCAB = 128256


def build_checkpoint(path: Path) -> None:
    import ml_dtypes
    from safetensors.numpy import save_file

    from tests.tiny import default_training_text, llama_config, train_sentencepiece

    if (path / "config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(train_sentencepiece(default_training_text(), 4000))
    config = llama_config(VOCAB, bos=1, eos=2, **SHAPE)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>"}))
    rng = np.random.default_rng(0)
    h, f, d = SHAPE["hidden"], SHAPE["ffn"], SHAPE["hidden"] // SHAPE["heads"]
    shards: list[dict] = [{}]

    def add(name, shape):
        if sum(a.nbytes for a in shards[-1].values()) > 1 << 30:
            shards.append({})
        shards[-1][name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    add("model.embed_tokens.weight", (VOCAB, h))
    for i in range(SHAPE["layers"]):
        p = f"model.layers.{i}."
        for n, s in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (SHAPE["kv_heads"] * d, h)),
                     ("self_attn.v_proj", (SHAPE["kv_heads"] * d, h)), ("self_attn.o_proj", (h, h)),
                     ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f)),
                     ("input_layernorm", (h,)), ("post_attention_layernorm", (h,))]:
            add(p + n + ".weight", s)
    add("model.norm.weight", (h,))
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map |= {n: name for n in shard}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a command, measured by a wrapper process around it."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
               "w = time.perf_counter() - t; "
               "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) if r.returncode == 0 "
               "else sys.exit(r.stderr[-2000:])")
    subprocess.run(["sync"])
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    wall, kib = out.stdout.split()
    return float(wall), int(kib) / 1024**2


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: t.data.tobytes() for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cl3-bench-convert")
    ap.add_argument("--reference-prefix", type=Path,
                    default=Path.home() / ".cache/cl3-reference" / __import__("llama_cpp").__version__)
    args = ap.parse_args()
    src = args.workdir / "llama-3.2-1b-shaped"
    print(f"building {src} …", flush=True)
    build_checkpoint(src)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rows = []
    copy_dir = args.workdir / "copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir()
    rows.append(("plain copy (cp)", *measure(["sh", "-c", f"cat {src}/*.safetensors > {copy_dir}/all.bin"])))
    ours = args.workdir / "cl3-f16.gguf"
    rows.append(("cl3 convert", *measure([sys.executable, "-m", "cl3", "convert", str(src), "-o", str(ours),
                                          "--outtype", "f16", "-q"])))
    ref_py = args.reference_prefix / "convert-venv/bin/python"
    theirs = args.workdir / "ref-f16.gguf"
    if ref_py.exists():
        rows.append(("convert_hf_to_gguf.py", *measure([str(ref_py), str(args.reference_prefix / "src/convert_hf_to_gguf.py"),
                                                        str(src), "--outfile", str(theirs), "--outtype", "f16"])))
    print(f"\ninput: {size / 1024**3:.2f} GiB bf16 safetensors, {SHAPE} vocab {VOCAB}\n")
    print(f"{'':24} {'wall s':>8} {'peak RSS GiB':>13}")
    for name, wall, rss in rows:
        print(f"{name:24} {wall:8.2f} {rss:13.3f}")
    t = {name: (wall, rss) for name, wall, rss in rows}
    copy_t = t["plain copy (cp)"][0]
    print(f"\ncl3 / copy time: {t['cl3 convert'][0] / copy_t:.2f}× (target ≤ 1.5×)")
    if "convert_hf_to_gguf.py" in t:
        ref_t, ref_rss = t["convert_hf_to_gguf.py"]
        print(f"cl3 / reference time: {t['cl3 convert'][0] / ref_t:.2f}× (target ≤ 0.5×)")
        print(f"cl3 / reference peak RSS: {t['cl3 convert'][1] / ref_rss:.2f}× (target ≤ 0.25×)")
        a, b = tensor_bytes(ours), tensor_bytes(theirs)
        same = sorted(n for n in a if a[n] == b.get(n))
        print(f"f16 tensor data identical: {len(same)}/{len(b)} tensors"
              + ("" if set(a) == set(b) else f"; names differ: {sorted(set(a) ^ set(b))[:5]}"))
    else:
        print(f"reference converter not found at {ref_py}: run WITH_CONVERT=1 bash benchmarks/build-llama-cpp-tools.sh")
    shutil.rmtree(copy_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
