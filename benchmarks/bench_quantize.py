"""cl3 imatrix vs llama-imatrix, cl3 quantize vs llama-quantize: same model, text, settings; wall time and peak RSS.

    python benchmarks/bench_quantize.py --reference-bin ~/.cache/cl3-reference/0.3.36/build/bin

Builds a synthetic Llama checkpoint (random weights; the shape is configurable), converts it to F16 with cl3, then runs
each pair once (or --repeat times, interleaved), as separate processes. Prints a table with ratios (cl3 / native) and writes
Markdown, CSV and JSON next to --out. Targets from the issue: imatrix <= 1.10x, quantize <= 1.05x the native time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import synthetic_f16_gguf

TARGETS = {"imatrix": 1.10, "quantize": 1.05}


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MiB) and CPU seconds (user + system) of one child process (its rusage, via wait4).
    CPU time is reported too because wall time on a shared machine mostly measures the neighbours."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-bin", type=Path, default=os.environ.get("CL3_REFERENCE_BIN"),
                        help="directory with llama-imatrix and llama-quantize (default: $CL3_REFERENCE_BIN)")
    parser.add_argument("--model", type=Path, help="an F16/F32 GGUF to use instead of the synthetic one")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--chunks", type=int, default=8, help="imatrix chunks of 512 tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--types", default="Q4_K_M,Q8_0,Q2_K")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool, interleaved; the fastest is reported")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cl3-bench-quantize")
    parser.add_argument("--out", type=Path, default=Path("bench_quantize"), help="results prefix (.md/.csv/.json)")
    args = parser.parse_args()
    if not args.reference_bin or not (args.reference_bin / "llama-quantize").exists():
        sys.exit("need llama.cpp's tools: pass --reference-bin or set CL3_REFERENCE_BIN")

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or synthetic_f16_gguf(work, args.hidden, args.layers, args.ffn)
    text = work / "calibration.txt"
    write_text = ("import sys; from cl3.calibration import calibration_text; "
                  "open(sys.argv[1], 'w', encoding='utf-8').write(calibration_text() + '\\n')")
    subprocess.run([sys.executable, "-c", write_text, text], check=True)
    cl3 = [sys.executable, "-m", "cl3"]
    bin_ = args.reference_bin
    t = str(args.threads)
    rows = []

    def fresh(cmd: list, output: Path) -> tuple[float, float, float]:
        """Each run starts alike: its previous output removed and every dirty page written back first (otherwise
        the run after a big write pays for the previous run's writeback and for unlinking its old output)."""
        output.unlink(missing_ok=True)
        os.sync()
        return run(cmd)

    def pair(ours_cmd: list, theirs_cmd: list, ours_out: Path, theirs_out: Path
             ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        runs = [(fresh(ours_cmd, ours_out), fresh(theirs_cmd, theirs_out)) for _ in range(max(1, args.repeat))]
        best = lambda results: (min(r[0] for r in results), max(r[1] for r in results),
                                min(r[2] for r in results))
        return best([r[0] for r in runs]), best([r[1] for r in runs])

    ours_im, theirs_im = work / "cl3.imatrix.gguf", work / "llama.imatrix.gguf"
    ours, theirs = pair([*cl3, "imatrix", model, "--calib", text, "-c", "512", "--chunks", args.chunks,
                         "--threads", t, "-o", ours_im, "-q"],
                        [bin_ / "llama-imatrix", "-m", model, "-f", text, "-c", "512", "--chunks", args.chunks,
                         "-t", t, "-o", theirs_im], ours_im, theirs_im)
    rows.append(("imatrix", f"{args.chunks} chunks x 512", ours, theirs))

    for file_type in args.types.split(","):
        ours_q, theirs_q = work / f"cl3-{file_type}.gguf", work / f"llama-{file_type}.gguf"
        ours, theirs = pair([*cl3, "quantize", model, file_type, "--imatrix", ours_im, "--threads", t,
                             "-o", ours_q, "-q"],
                            [bin_ / "llama-quantize", "--imatrix", ours_im, model, theirs_q, file_type, t],
                            ours_q, theirs_q)
        rows.append(("quantize", file_type, ours, theirs))

    table = []
    for step, what, (ours_s, ours_mb, ours_cpu), (theirs_s, theirs_mb, theirs_cpu) in rows:
        ratio = ours_s / theirs_s
        table.append({"step": step, "case": what, "cl3_s": round(ours_s, 2), "native_s": round(theirs_s, 2),
                      "time_ratio": round(ratio, 3), "target": TARGETS[step], "meets_target": ratio <= TARGETS[step],
                      "cl3_cpu_s": round(ours_cpu, 2), "native_cpu_s": round(theirs_cpu, 2),
                      "cpu_ratio": round(ours_cpu / theirs_cpu, 3),
                      "cl3_rss_mib": round(ours_mb, 1), "native_rss_mib": round(theirs_mb, 1),
                      "rss_ratio": round(ours_mb / theirs_mb, 2)})

    header = ["step", "case", "cl3 s", "native s", "time ×", "target", "cl3 CPU s", "native CPU s", "CPU ×",
              "cl3 RSS MiB", "native RSS MiB", "RSS ×"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        lines.append(f"| {r['step']} | {r['case']} | {r['cl3_s']:.2f} | {r['native_s']:.2f} | {r['time_ratio']:.2f} "
                     f"| ≤{r['target']:.2f}{'' if r['meets_target'] else ' ✗'} | {r['cl3_cpu_s']:.2f} "
                     f"| {r['native_cpu_s']:.2f} | {r['cpu_ratio']:.2f} | {r['cl3_rss_mib']:.0f} "
                     f"| {r['native_rss_mib']:.0f} | {r['rss_ratio']:.2f} |")
    size_mib = model.stat().st_size / 1024**2
    runs = "one run each" if args.repeat <= 1 else f"fastest of {args.repeat} interleaved runs"
    intro = f"model: {model.name} ({size_mib:.0f} MiB), threads: {args.threads}, {runs}"
    print(intro)
    print("\n".join(lines))
    args.out.with_suffix(".md").write_text(f"{intro}\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps({"model": str(model), "threads": args.threads,
                                                         "rows": table}, indent=2), encoding="utf-8")
    with open(args.out.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


if __name__ == "__main__":
    main()
