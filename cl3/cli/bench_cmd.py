"""`cl3 bench` (the authors' quantization table, measured here) and `cl3 plan` (sizes before downloading weights)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import BareImatrixCommand, app, err, imatrix_choice, out, progress_bar
from .options import FLAGS, Chunks, CtxSize, GpuLayers, NGen, NPrompt, Quiet, Repetitions, TextFile, Threads, Types

FLAGS.update(ray="--ray", shared="--shared", ray_cpus="--ray-cpus")  # bench_ray's parameters, as spelled here


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 / 10 else f"{n_bytes / 2**20:.2f} MiB"


def _split_types(types: list[str] | None) -> list[str] | None:
    if not types:
        return None
    return [t for item in types for t in item.split(",") if t.strip()]


def _is_ray_address(arg: str) -> bool:
    """`--ray ADDRESS` vs a bare `--ray` followed by SRC: an address is `auto` or HOST:PORT (not a file)."""
    return arg == "auto" or (bool(re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", arg)) and not os.path.exists(arg))


class BenchCommand(BareImatrixCommand):
    """`--ray` may be given alone: then the cluster `ray start` made on this machine (or RAY_ADDRESS)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--ray" and (i + 1 == len(args) or not _is_ray_address(args[i + 1])):
                fixed.append("auto")
        return super().parse_args(ctx, fixed)


@app.command(cls=BenchCommand)
def bench(
    srcs: Annotated[list[str], typer.Argument(metavar="SRC", help="F16/BF16/F32 GGUF, Hugging Face checkpoint "
                                                                      "directory or hub repo id; several make a "
                                                                      "table each plus a combined one.")],
    types: Types = None,
    imatrix: Annotated[Optional[str], typer.Option(
        "--imatrix", metavar="[FILE|both]", help="Quantize with this importance matrix; alone: compute one on cl3's "
                                                 "built-in calibration text (cached); both: each type with and "
                                                 "without that one, the better kept and marked.")] = None,
    mix: Annotated[Optional[list[str]], typer.Option(
        "--mix", metavar="TYPES", help="Add cl3's per-tensor mixes at the file sizes of these types (columns "
                                       "mix@TYPE); comma-separated or repeated.")] = None,
    measure: Annotated[str, typer.Option(
        "--measure", metavar="MODE", help="The mixes' sensitivity: auto, all, anchors, sample or proxy (see cl3 "
                                          "quantize --measure).")] = "auto",
    evals: Annotated[Optional[list[str]], typer.Option(
        "--eval", metavar="TASK[:SHOTS]", help="Add accuracy rows (cl3 eval): ceval, cmmlu or mmlu, 0- and 5-shot "
                                               "(ceval:5 for one), with flips vs F16; repeatable.")] = None,
    ctx_size: CtxSize = 8192,
    chunks: Chunks = None,
    text: TextFile = None,
    kld: Annotated[bool, typer.Option("--kld", help="Also measure the KL divergence of each type against "
                                                    "F16.")] = False,
    n_prompt: NPrompt = 512,
    n_gen: NGen = 128,
    repetitions: Repetitions = 5,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = -1,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", metavar="PATH", help="Table path without extension: writes NAME.md/.csv/.json/.png "
                                               "(default: quant_tables/<source name>; a folder: named after the "
                                               "source inside it; with several sources, always a folder).")] = None,
    compare: Annotated[Optional[Path], typer.Option(
        "--compare", metavar="CSV", help="A published table CSV to print side by side.")] = None,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]", help="Run the cells on a Ray cluster (run cl3 on one of its nodes); alone: "
                                           "the cluster `ray start` made here, or RAY_ADDRESS. Needs "
                                           "pip install 'cl3\\[ray]'.")] = None,
    shared: Annotated[bool, typer.Option(
        "--shared", help="With --ray: SRC, the output folder and the imatrix are on a filesystem every node mounts "
                         "at the same path (NFS, ...); nothing is shipped.")] = False,
    ray_cpus: Annotated[Optional[float], typer.Option(
        "--ray-cpus", metavar="N", help="With --ray: CPUs each cell asks for (default: all of the smallest "
                                        "node's, one cell per node at a time).")] = None,
    quiet: Quiet = False,
) -> None:
    """Quantize to each type and measure Size, BPW, PPL and pp/tg speed: the authors' table, on this machine or a
    Ray cluster."""
    from .. import bench as bench_mod
    from .. import bench_ray
    from ..errors import Interrupted, UsageError
    from ..files import is_directory_target, make_folder, output_directory
    from ..hf import check_model_source
    from ..hub import resolve_source

    if (shared or ray_cpus is not None) and ray is None:
        raise UsageError("--shared and --ray-cpus go with --ray")
    if ray is not None and (imatrix == "both" or mix or evals):
        raise UsageError("--imatrix both, --mix and --eval run on this machine only (not yet with --ray)")
    if ray is not None:
        bench_ray.import_ray()  # a clear line before any work when Ray is missing
    published = bench_mod.read_table_csv(compare) if compare else None  # bad --compare fails before any work
    paths = [resolve_source(s) for s in srcs]
    for src in paths:
        check_model_source(src)  # before creating the default output folder: bad input leaves nothing behind
    bench_ray.table_names(paths)  # two sources of one name: refused before any folder is made
    name = paths[0].name.removesuffix(".gguf") if len(paths) == 1 else ""
    if output is None:
        make_folder("quant_tables")
        output = Path("quant_tables") / name
    elif is_directory_target(output) or len(paths) > 1:  # several sources: always a folder
        output = output_directory(output) / name
    output = Path(output)

    def stage(description: str, unit: str):
        return progress_bar(description, unit=unit, quiet=quiet)

    both = imatrix == "both"
    settings = dict(types=_split_types(types), imatrix=True if both else imatrix_choice(imatrix), ctx=ctx_size,
                    chunks=chunks, text_file=text, kld=kld, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                    threads=threads, n_gpu_layers=n_gpu_layers, stage=stage)
    local = dict(imatrix_both=both, mix=_split_types(mix), mix_measure=measure, evals=evals)
    try:
        if ray is not None:
            with cluster_view(quiet) as on_status:
                result = bench_ray.bench_on_ray(paths, out=output, address=ray, shared=shared,
                                                cpus_per_cell=ray_cpus, on_status=on_status, **settings)
            tables, stems = result.tables, result.outs
            if result.combined is not None:
                tables, stems = [*tables, result.combined], [*stems, result.combined_out]
        else:
            stems = bench_ray.table_stems(paths, output)
            tables = [bench_mod.bench(src, out=stem, **settings, **local) for src, stem in zip(paths, stems)]
            if len(tables) > 1:
                tables.append(bench_mod.combine(tables, "combined"))
                stems.append(stems[0].parent / "combined")
                bench_mod.save(tables[-1], stems[-1], final=True)
    except KeyboardInterrupt:
        kept = [p for p in (bench_mod.table_file(s, ".json") for s in bench_ray.table_stems(paths, output))
                if p.exists()]
        if not kept:
            raise Interrupted("before the first cell was measured; nothing kept") from None
        raise Interrupted(f"measured cells are kept in {', '.join(map(str, kept))}; the same command continues "
                          "from there") from None
    for table, stem in zip(tables, stems):
        out.print(bench_mod.render_rich(table))
        written = [bench_mod.table_file(stem, s) for s in bench_mod.TABLE_EXTENSIONS]
        out.print("wrote " + ", ".join(str(p) for p in written if p.exists()))
    if published is not None:
        for table in tables[:len(paths)]:
            print_comparison(bench_mod.compare(table, published), compare)
    if ray is not None:
        print_cluster_summary(result)


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_cluster_summary(result) -> None:
    """Where the cells ran, what was retried, how many bytes went between nodes; failures as the error."""
    from ..errors import Cl3Error

    def host(node: str) -> str:
        return f"{result.nodes.get(node, {}).get('hostname', '?')} ({node[:8]})"

    per_node = ", ".join(f"{host(n)}: {c}" for n, c in sorted(result.cells_by_node.items()))
    moved = "nothing moved (shared filesystem)" if result.shared else (
        f"{_bytes(result.bytes_moved)} moved between nodes ("
        + (", ".join(f"to {host(n)}: {_bytes(b)}" for n, b in sorted(result.bytes_by_node.items())) or "none") + ")")
    out.print(f"cluster: {sum(result.cells_by_node.values())} cells on {len(result.cells_by_node)} nodes in "
              f"{result.seconds:.1f} s ({per_node}); {result.retried} retried; {moved}", highlight=False)
    for work, why in result.skipped.items():
        out.print(f"[yellow]not measured:[/] {work}: {why}", highlight=False)
    if result.failed:
        first, message = next(iter(result.failed.items()))
        more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
        raise Cl3Error(f"{len(result.failed)} cells failed; {first}: {message}{more}")


@contextlib.contextmanager
def cluster_view(quiet: bool):
    """One live view of the whole run: cells done/running/failed, and per node what runs there."""
    if quiet:
        yield None
        return
    from rich.live import Live

    with Live(console=err, refresh_per_second=4, transient=False) as live:
        shown = [False]

        def on_status(status) -> None:
            if not shown[0] and not status.total:
                return
            shown[0] = True
            live.update(render_status(status))
        yield on_status


def render_status(status) -> Table:
    t = Table(title=f"cells: {status.done}/{status.total} done, {status.running} running, {status.failed} failed, "
                    f"{status.retried} retried; {_bytes(status.bytes_moved)} moved", title_justify="left")
    for col in ("node", "hardware", "running", "done", "failed", "received"):
        t.add_column(col, justify="right" if col in ("done", "failed", "received") else "left")
    for node in sorted(status.nodes.values(), key=lambda n: n.hostname):
        name = f"{node.hostname} ({node.id[:8]})" + ("" if node.alive else " [red]gone[/]")
        t.add_row(name, node.kind, "; ".join(node.running) or "-", str(node.done), str(node.failed),
                  _bytes(node.received))
    return t


def print_comparison(rows: list[dict], source: Path) -> None:
    t = Table(title=f"published ({source}) vs measured")
    for col in ("metric", "type", "published", "measured", "measured/published"):
        t.add_column(col, justify="left" if col in ("metric", "type") else "right")
    for r in rows:
        t.add_row(r["label"], r["type"], "" if r["published"] is None else f"{r['published']:.3f}",
                  "" if r["measured"] is None else f"{r['measured']:.3f}",
                  "" if r["ratio"] is None else f"{r['ratio']:.3f}")
    out.print(t)


@app.command()
def plan(
    src: Annotated[str, typer.Argument(
        metavar="SRC", help="Checkpoint directory or config.json (tokenizer files beside it are used), or a Hugging "
                            "Face repo id (only its small files are fetched).")],
    types: Types = None,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", metavar="N",
                                          help="Context for the memory estimate (0: skip it).")] = 8192,
    vocab: Annotated[Optional[Path], typer.Option(
        "--vocab", metavar="GGUF", help="Take the tokenizer metadata from this GGUF (e.g. llama.cpp's "
                                        "models/ggml-vocab-llama-bpe.gguf) instead of tokenizer files.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {type, size_gib, bpw, ...}.")] = False,
) -> None:
    """Size (GiB), BPW and memory to run, for each quantization type, from config.json alone (llama.cpp plans it)."""
    from .. import plan as plan_mod

    with err.status("planning with llama.cpp…") if not as_json else contextlib.nullcontext():
        plans = plan_mod.plan(src, _split_types(types), ctx=ctx_size or None, vocab_gguf=vocab)
    if as_json:
        out.print_json(json.dumps([p.to_dict() for p in plans]))
        return
    t = Table(title=f"{src}: llama.cpp's quantization plan")
    t.add_column("type")
    t.add_column("file type")
    t.add_column("size", justify="right")
    t.add_column("BPW", justify="right")
    if ctx_size:
        t.add_column(f"memory at ctx {ctx_size}", justify="right")
    for p in plans:
        row = [p.type, p.file_type, _size(p.size_bytes), f"{p.bpw:.2f}"]
        if ctx_size:
            row.append(_size(p.memory_bytes))
        t.add_row(*row)
    out.print(t)
    note = "memory = weights + f16 KV cache + llama.cpp's compute buffer (CPU)."
    if plans and not plans[0].tokenizer:
        note += " No tokenizer files were found: sizes lack the tokenizer metadata (a few MB for large vocabularies)."
    out.print(f"[dim]{note}[/]")
