"""cl3 ppl vs llama-perplexity and cl3 speed vs llama-bench, side by side on the same model, text and settings.

    python benchmarks/bench_measure.py --reference-bin ~/.cache/cl3-reference/0.3.36/build/bin

Builds a synthetic Llama checkpoint (random weights; shape configurable), converts it to F16 and quantizes it to Q4_0
with cl3 (or takes --model), then runs each pair one after the other as separate processes:

- perplexity: the PPL ± error both tools print, and their wall times (target: cl3 <= 1.05x llama-perplexity);
- speed: pp512 and tg128 tokens/s of both (target: cl3 >= 0.95x llama-bench), with the memory-bandwidth floor of tg:
  model bytes / measured memory bandwidth (a numpy streaming read of a 1 GiB buffer), i.e. the fastest a token can
  be generated when all weights are read once per token.

Prints one table; writes Markdown, CSV and JSON next to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import synthetic_f16_gguf

TARGETS = {"ppl_time": 1.05, "speed": 0.95}


def run(cmd: list, want: str | None = None, tries: int = 4) -> tuple[str, float]:
    """Output (stdout+stderr) and wall seconds of one child process.

    llama.cpp's tools log from a thread that is not flushed at exit (llama.cpp issue 22142), so their last lines
    can be lost; the run is repeated until ``want`` is found in the output."""
    for _ in range(tries):
        start = time.perf_counter()
        proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}")
        if want is None or re.search(want, proc.stdout):
            return proc.stdout, wall
    sys.exit(f"no {want!r} in the output of {' '.join(map(str, cmd))}")


def build_model(work: Path, hidden: int, layers: int, ffn: int) -> Path:
    from cl3.quantize import quantize

    f16 = synthetic_f16_gguf(work, hidden, layers, ffn)
    q4 = work / f"bench-h{hidden}-l{layers}-f{ffn}-Q4_0.gguf"
    if not q4.exists():
        quantize(f16, ["Q4_0"], out=q4)
    return q4


def memory_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Streaming read bandwidth (GB/s): the best of a few numpy sums over a buffer much larger than the caches."""
    buf = np.ones(n_bytes // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-bin", type=Path, default=os.environ.get("CL3_REFERENCE_BIN"),
                        help="directory with llama-perplexity and llama-bench (default: $CL3_REFERENCE_BIN)")
    parser.add_argument("--model", type=Path, help="a GGUF to use instead of the synthetic Q4_0 one")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores, as both tools do")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cl3-bench-measure")
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "results" / "bench_measure")
    args = parser.parse_args()
    if not args.reference_bin or not (args.reference_bin / "llama-perplexity").exists():
        sys.exit("need --reference-bin (or CL3_REFERENCE_BIN) with llama-perplexity and llama-bench")
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(args.work, args.hidden, args.layers, args.ffn)

    from cl3 import llama
    from cl3.calibration import evaluation_text

    threads = args.threads or llama.physical_cpu_count()
    text_file = args.work / "evaluation.txt"
    text_file.write_text(evaluation_text(), encoding="utf-8")
    rows = []

    # each pair runs in the order A B B A and the better run of each tool counts: on a shared machine the load
    # drifts, and this keeps either tool from always getting the quieter moment
    cl3 = [sys.executable, "-m", "cl3"]
    ref_cmd = [args.reference_bin / "llama-perplexity", "-m", model, "-f", text_file, "-c", args.ctx,
               "--chunks", args.chunks, "-t", threads]
    our_cmd = [*cl3, "ppl", model, "-f", text_file, "-c", args.ctx, "--chunks", args.chunks, "-t", threads,
               "--json", "-q"]
    ref_runs, our_runs = [], []
    for which in "ABBA":
        if which == "A":
            ref_runs.append(run(ref_cmd, want="Final estimate"))
        else:
            our_runs.append(run(our_cmd))
    ref_out, ref_s = min(ref_runs, key=lambda r: r[1])
    our_out, our_s = min(our_runs, key=lambda r: r[1])
    ref_ppl = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", ref_out).groups()
    ours = json.loads(our_out[our_out.index("{"):])
    rows.append({"measure": f"perplexity c{args.ctx} x{args.chunks} chunks", "llama.cpp": f"{float(ref_ppl[0]):.4f} "
                 f"± {float(ref_ppl[1]):.4f}", "cl3": f"{ours['ppl']:.4f} ± {ours['stderr']:.4f}",
                 "ratio": ours["ppl"] / float(ref_ppl[0]), "target": "same number (±0.5%)"})
    rows.append({"measure": "perplexity wall time (s), best of 2", "llama.cpp": f"{ref_s:.2f}",
                 "cl3": f"{our_s:.2f}", "ratio": our_s / ref_s, "target": f"<= {TARGETS['ppl_time']}x"})

    # speed
    bench_cmd = [args.reference_bin / "llama-bench", "-m", model, "-p", 512, "-n", 128, "-r", args.repetitions,
                 "-t", threads, "-o", "json"]
    speed_cmd = [*cl3, "speed", model, "-p", 512, "-n", 128, "-r", args.repetitions, "-t", threads, "--json", "-q"]
    ref_tests: dict[str, dict] = {}
    our_tests: dict[str, dict] = {}
    for which in "ABBA":
        if which == "A":
            out, _ = run(bench_cmd, want=r"\]\s*$")
            for t in json.loads(out[out.index("[\n"):]):
                kind = "pp" if t["n_prompt"] else "tg"
                if kind not in ref_tests or t["avg_ts"] > ref_tests[kind]["avg_ts"]:
                    ref_tests[kind] = t
        else:
            out, _ = run(speed_cmd)
            mine = json.loads(out[out.index("{"):])
            for t in mine["tests"]:
                kind = t["name"][:2]
                if kind not in our_tests or t["avg_ts"] > our_tests[kind]["avg_ts"]:
                    our_tests[kind] = t
    bandwidth = memory_bandwidth_gbs()
    floor_ms = mine["model_bytes"] / (bandwidth * 1e9) * 1e3
    for kind, n in (("pp", 512), ("tg", 128)):
        r, o = ref_tests[kind], our_tests[kind]
        rows.append({"measure": f"{kind}{n} tokens/s, best of 2", "llama.cpp": f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}",
                     "cl3": f"{o['avg_ts']:.2f} ± {o['stdev_ts']:.2f}", "ratio": o["avg_ts"] / r["avg_ts"],
                     "target": f">= {TARGETS['speed']}x"})
    rows.append({"measure": "tg ms/token vs bandwidth floor", "llama.cpp": f"{1e3 / ref_tests['tg']['avg_ts']:.3f}",
                 "cl3": f"{our_tests['tg']['ms_per_token']:.3f}", "ratio": None,
                 "target": f"floor {floor_ms:.3f} ms = {mine['model_bytes'] / 2**20:.1f} MiB / {bandwidth:.1f} GB/s"})

    header = ["measure", "llama.cpp", "cl3", "ratio", "target"]
    print(f"model {model} ({mine['description']}, {mine['model_bytes'] / 2**20:.1f} MiB), {threads} threads")
    widths = [max(len(h), *(len(_cell(r[h])) for r in rows)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(_cell(r[h]).ljust(w) for h, w in zip(header, widths)))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    args.out.with_suffix(".json").write_text(json.dumps({"model": str(model), "threads": threads,
                                                         "bandwidth_gbs": bandwidth, "rows": rows}, indent=1))
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_cell(r[h]) for h in header) + " |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
