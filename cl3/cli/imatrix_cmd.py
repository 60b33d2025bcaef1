"""`cl3 imatrix`: importance matrix of a GGUF model over calibration text (llama.cpp's imatrix format)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .app import LazyProgress, app, err, out


@app.command()
def imatrix(
    model: Path = typer.Argument(None, help="GGUF model (F32/F16/BF16 or quantized); optional when only "
                                 "combining --in-file imatrices."),
    calib: list[Path] = typer.Option(None, "--calib", "-f", help="Calibration text file(s), UTF-8. Default: cl3's "
                                     "built-in Chinese/English calibration set."),
    ctx: int = typer.Option(512, "-c", "--ctx-size", help="Tokens per chunk."),
    chunks: int = typer.Option(None, "--chunks", help="Stop after this many chunks (default: all the text)."),
    output: Path = typer.Option(None, "-o", "--output", help="Output file (default: MODEL.imatrix.gguf beside it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the partial imatrix in --output."),
    in_files: list[Path] = typer.Option(None, "--in-file", help="Imatrix to add in (repeatable; GGUF or legacy "
                                        ".dat). Without MODEL: combine them into --output. With MODEL: start from "
                                        "their sum and add the text's statistics."),
    threads: int = typer.Option(None, "--threads", help="Threads (default: all cores)."),
    gpu_layers: int = typer.Option(0, "--gpu-layers", "-ngl", help="Layers to offload to a GPU (GPU builds)."),
    parse_special: bool = typer.Option(None, "--parse-special/--no-parse-special",
                                       help="Read <|special|> tokens in the text as tokens (default: on for the "
                                            "built-in text, off for your files, as llama-imatrix)."),
    process_output: bool = typer.Option(False, "--process-output", help="Also collect output.weight."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Compute an importance matrix with llama.cpp, from Python (same rules and file format as llama-imatrix)."""
    from .. import calibration
    from ..errors import InputError, OutputError, UsageError
    from ..imatrix import combine_imatrices, compute_imatrix, read_imatrix, write_imatrix

    combined = None
    if in_files:
        if resume:
            raise UsageError("--resume and --in-file cannot be combined")
        combined = combine_imatrices([read_imatrix(p) for p in in_files], ctx)
    if model is None:
        if combined is None:
            raise UsageError("give a GGUF model, or --in-file imatrices to combine")
        if output is None:
            raise UsageError("combining needs -o/--output")
        write_imatrix(combined, output)
        out.print(f"wrote {output} ({len(combined.entries)} entries, {combined.chunk_count} chunks of {ctx} tokens, "
                  f"combined from {len(in_files)} files)", highlight=False, soft_wrap=True)
        return
    if not model.is_file():
        raise InputError(f"no such GGUF file: {model}")
    if output is None:
        output = model.with_name(model.name.removesuffix(".gguf") + ".imatrix.gguf")
    if output.exists() and output.resolve() == model.resolve():
        raise UsageError(f"the output would overwrite the model: {output}")
    if not output.parent.is_dir() and str(output.parent):
        raise OutputError(f"output directory does not exist: {output.parent}")
    if calib:
        text, dataset = calibration.read_text_files(calib), ",".join(str(p) for p in calib)
        special = bool(parse_special)
    else:
        text, dataset = calibration.calibration_text(), calibration.builtin_name(calibration.CALIBRATION)
        special = parse_special is not False
    start = None
    if resume:
        if not output.is_file():
            raise InputError(f"--resume: no partial imatrix at {output}")
        start = read_imatrix(output)

    columns = [TextColumn("imatrix"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("ppl {task.fields[ppl]}")]
    saved = {"chunks": 0}

    def checkpoint(partial) -> None:
        write_imatrix(partial, output)
        saved["chunks"] = partial.chunk_count

    with LazyProgress(*columns, console=err, disable=quiet) as progress:
        task = progress.add_task("imatrix", total=None, ppl="-")
        try:
            result = compute_imatrix(
                model, text, dataset=dataset, n_ctx=ctx, chunks=chunks, threads=threads, gpu_layers=gpu_layers,
                parse_special=special, process_output=process_output, resume=start, start=combined,
                checkpoint=checkpoint,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
                on_perplexity=lambda ppl: progress.update(task, ppl=f"{ppl:.4f}"))
        except KeyboardInterrupt:
            progress.stop()
            if saved["chunks"]:
                err.print(f"interrupted: saved {saved['chunks']} chunks to {output}; continue with --resume",
                          highlight=False)
            else:
                err.print("interrupted before the first chunk completed; nothing saved")
            raise typer.Exit(130) from None
    write_imatrix(result.imatrix, output)
    ppl = f", perplexity {result.perplexity:.4f}" if result.perplexity else ""
    out.print(f"wrote {output} ({len(result.imatrix.entries)} entries, {result.imatrix.chunk_count} chunks of "
              f"{ctx} tokens{ppl})", highlight=False, soft_wrap=True)
