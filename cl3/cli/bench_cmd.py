"""`cl3 bench` (the authors' quantization table, measured here) and `cl3 plan` (sizes before downloading weights)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import BareImatrixCommand, app, err, imatrix_choice, out, progress_bar
from .options import Chunks, CtxSize, GpuLayers, NGen, NPrompt, Quiet, Repetitions, TextFile, Threads, Types


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 / 10 else f"{n_bytes / 2**20:.2f} MiB"


def _split_types(types: list[str] | None) -> list[str] | None:
    if not types:
        return None
    return [t for item in types for t in item.split(",") if t.strip()]


@app.command(cls=BareImatrixCommand)
def bench(
    src: Annotated[str, typer.Argument(metavar="SRC", help="F16/BF16/F32 GGUF, Hugging Face checkpoint directory "
                                                           "or hub repo id.")],
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
                                               "source inside it).")] = None,
    compare: Annotated[Optional[Path], typer.Option(
        "--compare", metavar="CSV", help="A published table CSV to print side by side.")] = None,
    quiet: Quiet = False,
) -> None:
    """Quantize to each type and measure Size, BPW, PPL and pp/tg speed: the authors' table, on this machine."""
    from .. import bench as bench_mod
    from ..errors import InputError
    from ..files import is_directory_target, output_directory
    from ..hub import resolve_source

    published = bench_mod.read_table_csv(compare) if compare else None  # bad --compare fails before any work
    src = resolve_source(src)
    if not src.exists():  # before creating the default output folder: bad input leaves nothing behind
        raise InputError(f"no such file or directory: {src}")
    name = src.name.removesuffix(".gguf")
    if output is None:
        output = Path("quant_tables") / name
        output.parent.mkdir(exist_ok=True)
    elif is_directory_target(output):
        output = output_directory(output) / name
    output = Path(output)

    def stage(description: str, unit: str):
        return progress_bar(description, unit=unit, quiet=quiet)

    both = imatrix == "both"
    table = bench_mod.bench(src, types=_split_types(types), out=output,
                            imatrix=True if both else imatrix_choice(imatrix), ctx=ctx_size, chunks=chunks,
                            text_file=text, kld=kld, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                            threads=threads, n_gpu_layers=n_gpu_layers, imatrix_both=both, mix=_split_types(mix),
                            mix_measure=measure, stage=stage)
    out.print(bench_mod.render_rich(table))
    stem = bench_mod.table_stem(output)
    written = [bench_mod.table_file(stem, s) for s in bench_mod.TABLE_EXTENSIONS]
    out.print("wrote " + ", ".join(str(p) for p in written if p.exists()))
    if published is not None:
        print_comparison(bench_mod.compare(table, published), compare)


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
