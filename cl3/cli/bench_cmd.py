"""`cl3 bench` (the authors' quantization table, measured here) and `cl3 plan` (sizes before downloading weights)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.table import Table

from .app import app, err, out, progress_bar
from .quantize_cmd import BUILTIN, _BareImatrixFlag


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 / 10 else f"{n_bytes / 2**20:.2f} MiB"


def _split_types(types: list[str] | None) -> list[str] | None:
    if not types:
        return None
    return [t for item in types for t in item.split(",") if t.strip()]


@app.command(cls=_BareImatrixFlag)
def bench(
    src: str = typer.Argument(..., help="F16/BF16/F32 GGUF, Hugging Face checkpoint directory or hub repo id."),
    types: list[str] = typer.Option(None, "--types", help="Quantization types, comma-separated (default: the "
                                    "authors' nine: F16,Q8_0,Q6_K,Q5_K,Q5_0,Q4_K,Q4_0,Q3_K,Q2_K)."),
    imatrix: str = typer.Option(None, "--imatrix", metavar="[FILE]", help="Quantize with this importance matrix; "
                                "alone: compute one on cl3's built-in calibration text (cached)."),
    ctx: int = typer.Option(8192, "-c", "--ctx", help="Perplexity context size (the authors used 8192)."),
    chunks: int = typer.Option(None, "--chunks", help="Score at most this many chunks."),
    text: Path = typer.Option(None, "--text", "-f", help="Evaluation text (default: the built-in one)."),
    kld: bool = typer.Option(False, "--kld", help="Also measure the KL divergence of each type against F16."),
    n_prompt: int = typer.Option(512, "-p", "--n-prompt", help="Prompt tokens of the speed test."),
    n_gen: int = typer.Option(128, "-n", "--n-gen", help="Generated tokens of the speed test."),
    repetitions: int = typer.Option(5, "-r", "--repetitions", help="Timed runs per speed test."),
    threads: int = typer.Option(None, "-t", "--threads", help="Threads (default: physical cores)."),
    output: Path = typer.Option(None, "-o", "--out", help="Table path without extension: writes NAME.md/.csv/.json"
                                "/.png (default: quant_tables/<source name>)."),
    compare: Path = typer.Option(None, "--compare", help="A published table CSV to print side by side."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
) -> None:
    """Quantize to each type and measure Size, BPW, PPL and pp/tg speed: the authors' table, on this machine."""
    from .. import bench as bench_mod
    from ..errors import InputError
    from ..hub import resolve_source

    published = bench_mod.read_table_csv(compare) if compare else None  # bad --compare fails before any work
    src = resolve_source(src)
    if not src.exists():  # before creating the default output folder: bad input leaves nothing behind
        raise InputError(f"no such file or directory: {src}")
    if output is None:
        name = src.name.removesuffix(".gguf")
        output = Path("quant_tables") / name
        output.parent.mkdir(exist_ok=True)
    imatrix_arg: str | bool | None = True if imatrix == BUILTIN else imatrix

    def stage(description: str, unit: str):
        return progress_bar(description, unit=unit, quiet=quiet)

    table = bench_mod.bench(src, types=_split_types(types), out=output, imatrix=imatrix_arg, ctx=ctx,
                            chunks=chunks, text_file=text, kld=kld, n_prompt=n_prompt, n_gen=n_gen,
                            repetitions=repetitions, threads=threads, stage=stage)
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
    src: str = typer.Argument(..., help="Checkpoint directory or config.json (tokenizer files beside it are used), "
                              "or a Hugging Face repo id (only its small files are fetched)."),
    types: list[str] = typer.Option(None, "--types", help="Types, comma-separated (default: every type)."),
    ctx: int = typer.Option(8192, "-c", "--ctx", help="Context for the memory estimate (0: skip it)."),
    vocab: Path = typer.Option(None, "--vocab", help="Take the tokenizer metadata from this GGUF (e.g. llama.cpp's "
                               "models/ggml-vocab-llama-bpe.gguf) instead of tokenizer files."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {type, size_gib, bpw, ...}."),
) -> None:
    """Size (GiB), BPW and memory to run, for each quantization type, from config.json alone (llama.cpp plans it)."""
    from .. import plan as plan_mod

    with err.status("planning with llama.cpp…") if not as_json else contextlib.nullcontext():
        plans = plan_mod.plan(src, _split_types(types), ctx=ctx or None, vocab_gguf=vocab)
    if as_json:
        out.print_json(json.dumps([p.to_dict() for p in plans]))
        return
    t = Table(title=f"{src}: llama.cpp's quantization plan")
    t.add_column("type")
    t.add_column("file type")
    t.add_column("size", justify="right")
    t.add_column("BPW", justify="right")
    if ctx:
        t.add_column(f"memory at ctx {ctx}", justify="right")
    for p in plans:
        row = [p.type, p.file_type, _size(p.size_bytes), f"{p.bpw:.2f}"]
        if ctx:
            row.append(_size(p.memory_bytes))
        t.add_row(*row)
    out.print(t)
    note = "memory = weights + f16 KV cache + llama.cpp's compute buffer (CPU)."
    if plans and not plans[0].tokenizer:
        note += " No tokenizer files were found: sizes lack the tokenizer metadata (a few MB for large vocabularies)."
    out.print(f"[dim]{note}[/]")
