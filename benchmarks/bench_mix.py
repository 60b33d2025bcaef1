"""cl3 quantize --target-size: what the sensitivity costs, and what the mixes buy.

    python benchmarks/bench_mix.py --reference-bin ~/.cache/cl3-reference/0.3.36/build/bin

1. Time (1B shape: synthetic Llama, hidden 2048, 16 layers, ffn 5632, random weights, F16): cl3's sensitivity
   (quantization error of every tensor in every candidate type, KLD measurements in the "sample" mode) and the
   allocation, next to one llama-imatrix pass over the same text (the ratio is the table's point).
2. Quality (the trained demo model, seeds 1 and 2): llama.cpp's Q2_K, Q3_K_M and Q4_K_M made by llama-quantize with
   an imatrix, and cl3's mixes at their file sizes with the same imatrix; mean KLD against F16 by
   llama-perplexity --kl-divergence on the held-out evaluation text (ratio mix / llama.cpp), and how well the
   proxy ranks against measured KLD (Spearman, the sensitivity measured in full).
3. ``--shape 8b`` (or 1b): the proxy-mode sensitivity of a Llama-3-8B-shaped model (32 layers, hidden 4096, FFN
   14336, Llama-3's 128,256-token vocabulary, random bf16 written by numpy: 16 GB, kept in --workdir, never committed)
   next to one ``llama-quantize … Q4_K_M`` of the same model on the same cores, the cores the sensitivity kept busy
   (CPU time / wall time), and the whole ``cl3 quantize --target-size`` run (sensitivity, plan, quantization, KLD
   check) at Q4_K_M's size. Goal: sensitivity <= one Q4_K_M, the whole run <= 2x that.
Prints the tables and writes Markdown and JSON next to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import synthetic_f16_gguf

TARGETS = ["Q2_K", "Q3_K_M", "Q4_K_M"]


def timed_stages():
    """A cl3 ``stage`` callback that records how long each stage took."""
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(description: str, unit: str):
        start = time.perf_counter()
        try:
            yield lambda done, total: None
        finally:
            seconds[description] = seconds.get(description, 0.0) + time.perf_counter() - start
    return stage, seconds


def run(cmd: list) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}")
    return time.perf_counter() - start, proc.stdout


def timing(args, work: Path) -> dict:
    from cl3 import calibration, mix
    from cl3.imatrix import read_imatrix
    from cl3.quantize import resolve_types

    model = args.model or synthetic_f16_gguf(work, 2048, 16, 5632)
    sample = mix._sample_text(model, calibration.calibration_text(), 512, args.chunks)
    text = work / "sensitivity-text.txt"
    text.write_text(sample, encoding="utf-8")
    imatrix = work / "timing.imatrix.gguf"
    imatrix_s, _ = run([args.reference_bin / "llama-imatrix", "-m", model, "-f", text, "-c", 512, "--chunks",
                        args.chunks, "-t", args.threads, "-o", imatrix])
    stage, seconds = timed_stages()
    t0 = time.perf_counter()
    sens = mix.sensitivity(model, importances=read_imatrix(imatrix).importances(), imatrix_name=str(imatrix),
                           mode=args.mode, chunks=args.chunks, threads=args.threads, cache_dir=work,
                           model_sha256="bench-" + model.name, stage=stage)
    sensitivity_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    q4 = resolve_types(["Q4_K_M"])[0]
    from cl3 import llama

    size = llama.quantized_file_size(model, {n: llama.ggml_type_by_name(t) for n, t in
                                             llama.quantize_plan(model, q4.ftype).items()}, q4.ftype)
    plan = mix.plan_mix(model, mix.Target.size(size), sens)
    allocation_s = time.perf_counter() - t0
    rows = [("llama-imatrix, one pass", imatrix_s)]
    rows += [(f"cl3 sensitivity: {k}", v) for k, v in seconds.items()]
    rows += [("cl3 sensitivity, all", sensitivity_s), ("cl3 allocation + dry-run check (Q4_K_M size)", allocation_s)]
    return {"model": str(model), "size_mib": model.stat().st_size / 2**20, "chunks": args.chunks, "mode": sens.mode,
            "tensors": len(sens.groups), "measurements": sens.measurements,
            "candidates": sum(len(g.candidates) for g in sens.groups), "plan_bytes": plan.size_bytes,
            "rows": [{"step": s, "seconds": round(v, 1), "x_imatrix": round(v / imatrix_s, 2)} for s, v in rows]}


SHAPES = {"8b": (4096, 32, 14336, 32, 8), "1b": (2048, 16, 5632, 32, 8), "mini": (256, 2, 512, 4, 2)}


def shape_gguf(work: Path, shape: str, reference_bin: Path) -> Path:
    """A bf16 GGUF of ``shape`` (hidden, layers, FFN, heads, KV heads) with random weights written tensor by tensor
    (bounded memory) and Llama-3's real vocabulary (llama.cpp's models/ggml-vocab-llama-bpe.gguf), reused if
    present."""
    import gguf
    import numpy as np

    hidden, layers, ffn, heads, kv_heads = SHAPES[shape]
    path = work / f"llama3-{shape}-shape-BF16.gguf"
    if path.exists():
        return path
    vocab_file = reference_bin.parent.parent / "src" / "models" / "ggml-vocab-llama-bpe.gguf"
    vocab = gguf.GGUFReader(vocab_file)
    tokens = [bytes(vocab.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8", "replace")
              for i in vocab.fields["tokenizer.ggml.tokens"].data]
    merges = [bytes(vocab.fields["tokenizer.ggml.merges"].parts[i]).decode("utf-8", "replace")
              for i in vocab.fields["tokenizer.ggml.merges"].data]
    types = [int(vocab.fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in vocab.fields["tokenizer.ggml.token_type"].data]
    n_vocab, kv = len(tokens), hidden * kv_heads // heads
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"Llama-3 {shape} shape (random)")
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128009)
    shapes = {"token_embd.weight": (n_vocab, hidden)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                   f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden),
                   f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    shapes |= {"output_norm.weight": (hidden,), "output.weight": (n_vocab, hidden)}
    for name, shp in shapes.items():
        if len(shp) == 1:
            w.add_tensor_info(name, shp, np.dtype(np.float32), shp[0] * 4)
        else:
            w.add_tensor_info(name, shp, np.dtype(np.uint16), shp[0] * shp[1] * 2,
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    rng = np.random.default_rng(0)
    with open(tmp, "ab") as f:
        for shp in shapes.values():
            f.write(b"\0" * (-f.tell() % 32))
            if len(shp) == 1:
                f.write(np.ones(shp, np.float32).tobytes())
                continue
            step = max(1, (1 << 24) // shp[1])
            for r in range(0, shp[0], step):
                block = (rng.standard_normal((min(step, shp[0] - r), shp[1]), dtype=np.float32) * 0.02)
                f.write((block.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    os.replace(tmp, path)
    return path


def shape_timing(args, work: Path) -> dict:
    """Proxy-mode sensitivity vs one llama-quantize Q4_K_M on the same cores, and the whole --target-size run."""
    from cl3 import calibration, llama, mix
    from cl3.imatrix import read_imatrix

    model = shape_gguf(work, args.shape, args.reference_bin)
    text = work / "sensitivity-text.txt"
    text.write_text(mix._sample_text(model, calibration.calibration_text(), 512, 2), encoding="utf-8")
    imatrix = work / f"{model.stem}.imatrix.gguf"
    if not imatrix.exists():
        run([args.reference_bin / "llama-imatrix", "-m", model, "-f", text, "-c", 512, "--chunks", 2,
             "-t", args.threads, "-o", imatrix])
    q4 = work / f"{model.stem}-Q4_K_M.gguf"
    q4.unlink(missing_ok=True)
    quantize_s, _ = run([args.reference_bin / "llama-quantize", "--imatrix", imatrix, model, q4, "Q4_K_M",
                         args.threads])
    for old in work.glob(f"{model.stem}.*.sensitivity*.json"):
        old.unlink()
    stage, seconds = timed_stages()
    t0, cpu0 = time.perf_counter(), time.process_time()
    mix.sensitivity(model, importances=read_imatrix(imatrix).importances(), imatrix_name=str(imatrix),
                    mode="proxy", threads=args.threads, cache_dir=work, stage=stage)
    sensitivity_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    for old in work.glob(f"{model.stem}.*.sensitivity*.json"):
        old.unlink()
    out = work / f"{model.stem}-mix.gguf"
    for p in (out, *mix.recipe_paths(out)):
        p.unlink(missing_ok=True)
    whole_s, _ = run([sys.executable, "-m", "cl3", "quantize", model, "--target-size", q4.stat().st_size,
                      "--imatrix", imatrix, "--measure", "proxy", "-t", args.threads, "-o", out, "-q"])
    with llama.GgufFile(model) as f:
        n_params = sum(t.n_elements for t in f.tensors)
    return {"shape": args.shape, "model": str(model), "params": n_params, "size_gib": model.stat().st_size / 2**30,
            "threads": args.threads, "cpus": os.cpu_count(), "llama_quantize_q4_k_m_s": round(quantize_s, 1),
            "sensitivity_s": round(sensitivity_s, 1), "sensitivity_cores_busy": round(cpu_s / sensitivity_s, 2),
            "sensitivity_stages_s": {k: round(v, 1) for k, v in seconds.items()},
            "target_size_run_s": round(whole_s, 1), "mix_bytes": out.stat().st_size, "q4_k_m_bytes": q4.stat().st_size,
            "load_average": os.getloadavg()}


def quality(args, work: Path) -> dict:
    from cl3 import mix
    from cl3.calibration import builtin_name, calibration_text, evaluation_text
    from cl3.convert import convert
    from cl3.demo_model import build_demo_checkpoint
    from cl3.imatrix import compute_imatrix, read_imatrix, write_imatrix
    from cl3.quantize import quantize

    text = work / "evaluation.txt"
    text.write_text(evaluation_text(), encoding="utf-8")
    tool = args.reference_bin / "llama-perplexity"

    def kld(model: Path, base: Path) -> float:
        for _ in range(8):  # llama.cpp's log thread may drop the last lines (see tests/test_measure.py)
            _, log = run([tool, "-m", model, "-t", args.threads, "--kl-divergence-base", base, "--kl-divergence"])
            if m := re.search(r"Mean    KLD:\s+([-\d.]+)", log):
                return float(m.group(1))
        sys.exit(f"no KLD from llama-perplexity for {model}")

    rows, spearman = [], {}
    for seed in args.seeds:
        root = work / f"demo{seed}"
        root.mkdir(exist_ok=True)
        f16 = root / "F16.gguf"
        if not f16.exists():
            convert(build_demo_checkpoint(root / "hf", seed=seed).path, f16, "f16")
        imatrix = root / "imatrix.gguf"
        if not imatrix.exists():
            write_imatrix(compute_imatrix(f16, calibration_text(), dataset=builtin_name("calibration"),
                                          parse_special=True).imatrix, imatrix)
        base = root / "evaluation.kld"
        if not base.exists():
            run([tool, "-m", f16, "-f", text, "-c", 512, "-t", args.threads, "--kl-divergence-base", base])
        sens = mix.sensitivity(f16, importances=read_imatrix(imatrix).importances(), imatrix_name=str(imatrix),
                               mode="all", chunks=4, threads=args.threads)
        spearman[seed] = sens.spearman
        for name in TARGETS:
            standard = root / f"{name}.gguf"
            if not standard.exists():
                run([args.reference_bin / "llama-quantize", "--imatrix", imatrix, f16, standard, name])
            out = root / f"mix-{name}.gguf"
            for p in (out, *mix.recipe_paths(out)):
                p.unlink(missing_ok=True)
            r = quantize(f16, target=mix.Target.size(standard.stat().st_size), imatrix=imatrix, out=out,
                         measure="all", threads=args.threads)
            a, b = kld(standard, base), kld(out, base)
            rows.append({"model": f"demo seed {seed}", "target": name, "size": standard.stat().st_size,
                         "mix_size": out.stat().st_size, "kld_llama_cpp": a, "kld_mix": b,
                         "change_pct": round(100 * (b / a - 1), 1), "kld_predicted": r.plan.predicted_kld,
                         "kld_measured_sensitivity_text": r.mix.measured_kld})
    return {"rows": rows, "spearman": spearman}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-bin", type=Path, default=os.environ.get("CL3_REFERENCE_BIN"),
                        help="directory with llama-imatrix, llama-quantize, llama-perplexity")
    parser.add_argument("--model", type=Path, help="an F16 GGUF to time instead of the synthetic 1B-shape one")
    parser.add_argument("--mode", default="sample", help="sensitivity mode timed (default: sample)")
    parser.add_argument("--chunks", type=int, default=4, help="512-token chunks per measurement (and imatrix pass)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="only the proxy sensitivity vs llama-quantize Q4_K_M "
                        "on this model shape (8b: 16 GB written to --workdir)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cl3-bench-mix")
    parser.add_argument("--out", type=Path, default=Path("bench_mix"), help="results prefix (.md/.json)")
    args = parser.parse_args()
    if not args.reference_bin or not (args.reference_bin / "llama-perplexity").exists():
        sys.exit("need llama.cpp's tools: pass --reference-bin or set CL3_REFERENCE_BIN")
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CL3_CACHE_DIR", str(args.workdir / "cache"))
    result: dict = {}
    lines: list[str] = []
    if args.shape:
        r = result["shape"] = shape_timing(args, args.workdir)
        ok = "✓" if r["sensitivity_s"] <= r["llama_quantize_q4_k_m_s"] else "✗"
        ok2 = "✓" if r["target_size_run_s"] <= 2 * r["llama_quantize_q4_k_m_s"] else "✗"
        lines += [f"{args.shape} shape ({r['params'] / 1e9:.2f} B parameters, {r['size_gib']:.1f} GiB BF16), "
                  f"{r['threads']} threads on {r['cpus']} CPUs (load average at the end "
                  f"{r['load_average'][0]:.1f}):", "", "| step | seconds | note |", "|---|---|---|",
                  f"| llama-quantize Q4_K_M (imatrix) | {r['llama_quantize_q4_k_m_s']:.1f} | |",
                  f"| cl3 sensitivity, proxy mode | {r['sensitivity_s']:.1f} | {ok} ≤ Q4_K_M; "
                  f"{r['sensitivity_cores_busy']:.2f} cores busy on average |",
                  f"| cl3 quantize --target-size (Q4_K_M's size), whole run | {r['target_size_run_s']:.1f} | "
                  f"{ok2} ≤ 2× Q4_K_M; mix {r['mix_bytes']} vs Q4_K_M {r['q4_k_m_bytes']} bytes |", ""]
        args.skip_timing = args.skip_quality = True
    if not args.skip_timing:
        t = result["timing"] = timing(args, args.workdir)
        lines += [f"Sensitivity and allocation, {Path(t['model']).name} ({t['size_mib']:.0f} MiB F16), "
                  f"{t['tensors']} tensors x {t['candidates'] / t['tensors']:.1f} candidate types, mode "
                  f"{t['mode']} ({t['measurements']} KLD measurements of {t['chunks']} x 512 tokens), "
                  f"{args.threads} threads:", "", "| step | seconds | × one imatrix pass |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['seconds']:.1f} | {r['x_imatrix']:.2f} |" for r in t["rows"]]
        lines.append("")
    if not args.skip_quality:
        q = result["quality"] = quality(args, args.workdir)
        lines += ["Mean KLD against F16 by llama-perplexity on the held-out evaluation text (59 chunks of 512), "
                  "same imatrix for both:", "",
                  "| model | target | llama.cpp bytes | mix bytes | KLD llama.cpp | KLD mix | change |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['target']} | {r['size']} | {r['mix_size']} | {r['kld_llama_cpp']:.4f} "
                  f"| {r['kld_mix']:.4f} | {r['change_pct']:+.1f} % |" for r in q["rows"]]
        lines += ["", "Proxy vs measured KLD (Spearman, every tensor and type measured):", ""]
        lines += [f"- seed {seed}: raw imatrix-weighted error {s['raw_proxy']:.3f} over {s['pairs']} pairs; "
                  f"calibrated from the Q2_K/Q4_K/Q6_K anchors alone {s['anchors_held_out']:.3f} over "
                  f"{s['held_out_pairs']} held-out pairs" for seed, s in q["spearman"].items()]
    print("\n".join(lines))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
