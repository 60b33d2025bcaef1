"""One `cl3 bench` table built without Ray, on a one-node Ray cluster and on a two-node one, side by side.

    python benchmarks/bench_cluster.py [--types Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M] [--chunks 8]

Builds a synthetic Llama checkpoint (random weights) converted to F16, then measures the same table (quantize, PPL +
KLD, speed per type) three ways, each from scratch: `cl3.bench.bench` in this process; `bench_on_ray` on a cluster of
one node; `bench_on_ray` on a cluster of two nodes (`ray start --head` plus `ray start --address`, each started with
`--num-cpus` CPUS and its own temp folder, on this machine). Every cell runs with `-t CPUS` threads, so a node is a
machine of CPUS cores. Without a shared filesystem, so the worker node receives the source and the KLD base once and
sends its quantized models back: the bytes moved are counted.

Prints: wall time, cells, seconds per cell, bytes moved and the time spent receiving them (shipping per cell), the
overhead per cell of Ray itself (scheduling, worker processes, actors: (1-node wall - no-Ray wall) / cells, nothing
shipped on one node) and the two-node speed-up; and whether every PPL/KLD figure is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import synthetic_f16_gguf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`ray start` nodes on this machine; stopped by killing the processes of their own temp folders only."""

    def __init__(self, base: Path, cpus: int):
        self.base, self.cpus, self.address, self.folders = base, cpus, "", []

    def add(self) -> None:
        temp = self.base / f"node{len(self.folders)}"
        (temp / "tmp").mkdir(parents=True)
        args = ["--num-cpus", str(self.cpus), "--object-store-memory", str(256 << 20), "--temp-dir", str(temp),
                "--disable-usage-stats", "--dashboard-agent-listen-port", "0"]
        if not self.address:
            port = free_port()
            args += ["--head", "--port", str(port), "--include-dashboard=false", "--dashboard-port", str(free_port())]
            self.address = f"127.0.0.1:{port}"
        else:
            args += ["--address", self.address]
        env = os.environ | {"TMPDIR": str(temp / "tmp"), "RAY_USAGE_STATS_ENABLED": "0",
                            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.folders.append(str(temp))

    def stop(self) -> None:
        import psutil

        procs = {p for p in psutil.process_iter(["cmdline"])
                 if any(f in a for a in (p.info["cmdline"] or []) for f in self.folders)}
        for p in list(procs):
            try:
                procs.update(p.children(recursive=True))
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(procs), timeout=10)


def cells_of(table) -> int:
    return sum(1 for c in table.cells.values() for k in ("quantize", "ppl") if k in c.get("ran_on", {})) + sum(
        len(c.get("speed", {})) for c in table.cells.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs (and threads) of each node")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cl3-bench-cluster")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    from cl3 import bench, bench_ray

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = synthetic_f16_gguf(work, args.hidden, args.layers, args.ffn)
    settings = dict(types=args.types.split(","), ctx=args.ctx, chunks=args.chunks, kld=True, n_prompt=128, n_gen=32,
                    repetitions=3, threads=args.cpus)
    runs = {}

    def fresh(name: str) -> Path:
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        return folder / "table"

    t0 = time.perf_counter()
    table = bench.bench(model, out=fresh("local"), **settings)
    # quantize, ppl, speed per type, and the F16 KLD base (as the cluster counts them)
    runs["no Ray"] = {"wall": time.perf_counter() - t0, "table": table, "cells": 3 * len(table.types) + 1, "moved": 0}

    for n_nodes in (1, 2):
        cluster = Cluster(Path(tempfile.mkdtemp(prefix="cl3bc", dir="/tmp")), args.cpus)
        try:
            for _ in range(n_nodes):
                cluster.add()
            t0 = time.perf_counter()
            result = bench_ray.bench_on_ray([model], out=fresh(f"ray{n_nodes}"), address=cluster.address,
                                            **settings)
            wall = time.perf_counter() - t0
        finally:
            cluster.stop()
            shutil.rmtree(cluster.base, ignore_errors=True)
        assert not result.failed, result.failed
        runs[f"Ray, {n_nodes} node" + "s" * (n_nodes > 1)] = {
            "wall": wall, "table": result.tables[0], "cells": sum(result.cells_by_node.values()),
            "moved": result.bytes_moved, "by_node": result.cells_by_node, "copies": len(result.copies),
            "transfer": result.transfer_seconds}

    base = runs["no Ray"]
    one = runs["Ray, 1 node"]
    rows = [("wall time (s)", lambda r: f"{r['wall']:.1f}"),
            ("cells", lambda r: str(r["cells"])),
            ("seconds per cell", lambda r: f"{r['wall'] / r['cells']:.2f}"),
            ("cells per node", lambda r: " + ".join(str(c) for c in r.get("by_node", {}).values()) or "-"),
            ("bytes moved between nodes", lambda r: f"{r['moved'] / 2**20:.1f} MiB" + (
                f" ({r['copies']} file copies)" if r.get("copies") else "")),
            ("receiving them (s, all nodes)", lambda r: f"{r['transfer']:.2f}" if r.get("transfer") else "-"),
            ("shipping per cell (s)", lambda r: f"{r['transfer'] / r['cells']:.3f}" if r.get("transfer") else "-"),
            ("Ray overhead per cell (s)",  # scheduling, worker processes, actors: one node, nothing shipped
             lambda r: f"{(r['wall'] - base['wall']) / r['cells']:+.2f}" if r is one else "-"),
            ("speed-up vs 1 node", lambda r: "-" if r is base else f"{one['wall'] / r['wall']:.2f}x")]
    names = list(runs)
    width = max(len(r[0]) for r in rows)
    print(f"model {model.name} ({model.stat().st_size / 2**20:.0f} MiB), types {args.types}, ctx {args.ctx} x "
          f"{args.chunks} chunks + KLD, {args.cpus} CPU(s) and thread(s) per node, {os.cpu_count()} cores here")
    print(f"{'':{width}}  " + "  ".join(f"{n:>18}" for n in names))
    for label, fmt in rows:
        print(f"{label:{width}}  " + "  ".join(f"{fmt(runs[n]):>18}" for n in names))
    same = all(runs[n]["table"].cells[t].get(k) == base["table"].cells[t].get(k)
               for n in names for t in base["table"].types for k in ("ppl", "ppl_stderr", "kld_mean"))
    print(f"PPL, its standard error and KLD identical in all three tables: {'yes' if same else 'NO'}")
    if args.out:
        args.out.write_text(json.dumps({n: {k: v for k, v in r.items() if k != "table"} for n, r in runs.items()},
                                       indent=1))


if __name__ == "__main__":
    main()
