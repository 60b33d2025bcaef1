"""`cl3 imatrix`: importance matrix of a GGUF model over calibration text (llama.cpp's imatrix format)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .app import LazyProgress, app, err, out
from .options import BatchSize, Chunks, CtxSize, Force, GpuLayers, Output, Quiet, Threads


@app.command()
def imatrix(
    model: Annotated[Optional[Path], typer.Argument(
        metavar="MODEL", help="GGUF model (F32/F16/BF16 or quantized); optional when only combining --in-file "
                              "imatrices.")] = None,
    files: Annotated[Optional[list[Path]], typer.Option(
        "-f", "--file", metavar="FILE", help="Calibration text file(s), UTF-8 (repeatable). Default: cl3's built-in "
                                             "Chinese/English calibration set.")] = None,
    ctx_size: CtxSize = 512,
    chunks: Chunks = None,
    batch_size: BatchSize = 2048,
    output: Output = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the partial imatrix in --output.")] = False,
    in_files: Annotated[Optional[list[Path]], typer.Option(
        "--in-file", metavar="FILE", help="Imatrix to add in (repeatable; GGUF or legacy .dat). Without MODEL: "
                                          "combine them into --output. With MODEL: start from their sum and add "
                                          "the text's statistics.")] = None,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = -1,
    parse_special: Annotated[Optional[bool], typer.Option(
        "--parse-special/--no-parse-special", help="Read <|special|> tokens in the text as tokens (default: on for "
                                                   "the built-in text, off for your files, as llama-imatrix).")] = None,
    process_output: Annotated[bool, typer.Option("--process-output", help="Also collect output.weight.")] = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Compute an importance matrix with llama.cpp, from Python (same rules and file format as llama-imatrix).

    Default output: MODEL.imatrix.gguf beside the model (default file name inside a folder given as -o DIR/).
    """
    from .. import errors
    from ..imatrix import Interrupted, make_imatrix

    columns = [TextColumn("imatrix"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("ppl {task.fields[ppl]}")]
    with LazyProgress(*columns, console=err, disable=quiet) as progress:
        task = progress.add_task("imatrix", total=None, ppl="-")
        try:
            run = make_imatrix(model, files, out=output, resume=resume, in_files=in_files, force=force,
                               n_ctx=ctx_size, chunks=chunks, n_batch=batch_size, threads=threads,
                               n_gpu_layers=n_gpu_layers, parse_special=parse_special, process_output=process_output,
                               progress=lambda done, total: progress.update(task, completed=done, total=total),
                               on_perplexity=lambda ppl: progress.update(task, ppl=f"{ppl:.4f}"))
        except Interrupted as ex:
            progress.stop()
            if ex.saved_chunks:
                raise errors.Interrupted(f"saved {ex.saved_chunks} chunks to {ex.path}; continue with --resume") \
                    from None
            raise errors.Interrupted("before the first chunk completed; nothing saved") from None
    what = f"combined from {run.combined} files" if model is None else (
        f"perplexity {run.perplexity:.4f}, {run.backend}" if run.perplexity else run.backend)
    out.print(f"wrote {run.path} ({len(run.imatrix.entries)} entries, {run.imatrix.chunk_count} chunks of "
              f"{run.imatrix.chunk_size or ctx_size} tokens{', ' + what if what else ''})",
              highlight=False, soft_wrap=True)
