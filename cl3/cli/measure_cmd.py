"""`cl3 ppl` and `cl3 speed`: perplexity / KL divergence and pp/tg speed, as llama-perplexity and llama-bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .app import LazyProgress, app, err, out
from .options import (
    BatchSize,
    Chunks,
    CtxSize,
    Force,
    GpuLayers,
    Json,
    NGen,
    NPrompt,
    Quiet,
    Repetitions,
    TextFile,
    Threads,
)


def _running_ppl_bar(quiet: bool) -> LazyProgress:
    return LazyProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("PPL {task.fields[ppl]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err, disable=quiet, transient=True)


@app.command()
def ppl(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="GGUF model.")],
    text: TextFile = None,
    ctx_size: CtxSize = 512,
    chunks: Chunks = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", metavar="N", help="Tokens per decode; "
                                            "n_batch / ctx-size chunks run side by side.")] = 2048,
    kld_base: Annotated[Optional[Path], typer.Option(
        "--kld-base", metavar="FILE", help="Base model (GGUF) or base-logits file to compute the KL divergence "
                                           "against.")] = None,
    save_kld_base: Annotated[Optional[Path], typer.Option(
        "--save-kld-base", metavar="FILE", help="Write this model's logits as a KLD base file (llama-perplexity "
                                                "--kl-divergence-base format).")] = None,
    compact: Annotated[bool, typer.Option(
        "--compact", help="With --save-kld-base: cl3's compact base (each token's top k log-probabilities and the "
                          "rest's mass; 10x smaller by default; its KLD is a lower bound).")] = False,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", metavar="K", help="Tokens kept per position in a compact base (default: vocabulary / 48).")] = None,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = -1,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity of MODEL on a text, the way llama-perplexity computes it (and KL divergence with --kld-base)."""
    from .. import measure
    from ..calibration import read_text_files
    from ..errors import UsageError

    if (compact or top_k is not None) and save_kld_base is None:
        raise UsageError("--compact and --top-k describe the base file --save-kld-base writes")
    body = read_text_files([text]) if text is not None else None
    with _running_ppl_bar(quiet or as_json) as bar:
        task = bar.add_task("perplexity", total=None, ppl="…")

        def on_chunk(done: int, running: float) -> None:
            bar.update(task, ppl=f"{running:.4f}")

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if save_kld_base is not None:
            result = measure.save_base_logits(model, save_kld_base, body, n_ctx=ctx_size, n_batch=batch_size,
                                              chunks=chunks, threads=threads, n_gpu_layers=n_gpu_layers,
                                              compact=compact, top_k=top_k, force=force, progress=progress)
        else:
            result = measure.perplexity(model, body, n_ctx=ctx_size, n_batch=batch_size, chunks=chunks,
                                        threads=threads, n_gpu_layers=n_gpu_layers, kld_base=kld_base,
                                        progress=progress, on_chunk=on_chunk)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(f"[bold]PPL = {result.ppl:.4f} ± {result.stderr:.5f}[/]  ({result.chunks} chunks of {result.n_ctx} "
              f"tokens, {result.tokens} scored tokens, {result.seconds:.1f} s, {result.threads} threads, {result.backend})")
    if save_kld_base is not None:
        out.print(f"wrote the KLD base {save_kld_base} ({save_kld_base.stat().st_size / 2**20:.1f} MiB)")
    if result.kld is not None:
        print_kld(result.kld, kld_base)


def print_kld(k, base) -> None:
    """Every statistic llama-perplexity --kl-divergence prints, in its order."""
    def pct(x: float) -> str:
        return f"{100 * x:.3f} %"

    rows = [
        ("Mean PPL(Q)", f"{k.ppl:.6f} ± {k.ppl_stderr:.6f}"),
        ("Mean PPL(base)", f"{k.ppl_base:.6f} ± {k.ppl_base_stderr:.6f}"),
        ("Cor(ln(PPL(Q)), ln(PPL(base)))", f"{100 * k.ln_ppl_cor:.2f} %"),
        ("Mean ln(PPL(Q)/PPL(base))", f"{k.ln_ppl_ratio:.6f} ± {k.ln_ppl_ratio_stderr:.6f}"),
        ("Mean PPL(Q)/PPL(base)", f"{k.ppl_ratio:.6f} ± {k.ppl_ratio_stderr:.6f}"),
        ("Mean PPL(Q)-PPL(base)", f"{k.ppl_diff:.6f} ± {k.ppl_diff_stderr:.6f}"),
        ("Mean KLD", f"{k.kld_mean:.6f} ± {k.kld_stderr:.6f}"),
        ("Maximum KLD", f"{k.kld_max:.6f}"),
        *[(f"{label} KLD", f"{getattr(k, 'kld_' + key):.6f}") for label, key in
          (("99.9%", "p99_9"), ("99.0%", "p99"), ("95.0%", "p95"), ("90.0%", "p90"), ("Median", "median"),
           ("10.0%", "p10"), ("5.0%", "p5"), ("1.0%", "p1"), ("0.1%", "p0_1"))],
        ("Minimum KLD", f"{k.kld_min:.6f}"),
        ("Mean Δp", f"{100 * k.dp_mean:.3f} ± {100 * k.dp_stderr:.3f} %"),
        ("Maximum Δp", pct(k.dp_max)),
        *[(f"{label} Δp", pct(getattr(k, "dp_" + key))) for label, key in
          (("99.9%", "p99_9"), ("99.0%", "p99"), ("95.0%", "p95"), ("90.0%", "p90"), ("75.0%", "p75"),
           ("Median", "median"), ("25.0%", "p25"), ("10.0%", "p10"), ("5.0%", "p5"), ("1.0%", "p1"),
           ("0.1%", "p0_1"))],
        ("Minimum Δp", pct(k.dp_min)),
        ("RMS Δp", f"{100 * k.dp_rms:.3f} ± {100 * k.dp_rms_stderr:.3f} %"),
        ("Same top p", f"{100 * k.same_top:.3f} ± {100 * k.same_top_stderr:.3f} %"),
    ]
    table = Table(title=f"KL divergence vs {base}", show_header=True)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    if k.base_top_k:
        out.print(f"[dim]compact base: the top {k.base_top_k} tokens hold {100 * (1 - k.base_tail_mass):.2f} % of "
                  "the base's probability; the KLD leaves out the divergence inside the rest (a lower bound).[/]")


@app.command()
def speed(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="GGUF model.")],
    n_prompt: NPrompt = 512,
    n_gen: NGen = 128,
    repetitions: Repetitions = 5,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = -1,
    batch_size: BatchSize = 2048,
    ubatch_size: Annotated[int, typer.Option("-ub", "--ubatch-size", metavar="N",
                                             help="Physical batch size (n_ubatch).")] = 512,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Prompt-processing and text-generation speed, the way llama-bench measures them."""
    from .. import measure

    with LazyProgress(TextColumn("benchmarking"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, disable=quiet or as_json, transient=True) as bar:
        task = bar.add_task("runs", total=None)
        result = measure.speed(model, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, threads=threads,
                               n_gpu_layers=n_gpu_layers, n_batch=batch_size, n_ubatch=ubatch_size,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    print_speed(result)


def print_speed(result) -> None:
    table = Table(show_header=True)
    for col in ("model", "size", "params", "backend", "threads", "test", "t/s", "ms/token"):
        table.add_column(col, justify="left" if col in ("model", "backend", "test") else "right")
    size = (f"{result.model_bytes / 2**30:.2f} GiB" if result.model_bytes >= 2**30
            else f"{result.model_bytes / 2**20:.2f} MiB")
    params = f"{result.n_params / 1e9:.2f} B" if result.n_params >= 1e9 else f"{result.n_params / 1e6:.2f} M"
    for t in result.tests:
        table.add_row(result.description, size, params,
                      result.backend.get("layers", result.backend.get("backend", "?")), str(result.threads), t.name,
                      f"{t.avg_ts:.2f} ± {t.stdev_ts:.2f}", f"{t.ms_per_token:.3f} ± {t.ms_per_token_stdev:.3f}")
    out.print(table)
    out.print(f"[dim]llama-cpp-python {result.backend.get('llama_cpp_python')}, {result.repetitions} runs after a "
              f"warm-up, n_batch {result.n_batch}, n_ubatch {result.n_ubatch}; "
              f"{result.backend.get('system_info', '')}[/]", highlight=False)
