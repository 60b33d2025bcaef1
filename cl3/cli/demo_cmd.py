"""`cl3 demo`: convert → imatrix → quantize → measure on the embedded demo model, offline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .app import app, err, out, progress_bar
from .options import GpuLayers, Quiet, Threads


@app.command()
def demo(
    output: Path = typer.Option(Path("cl3-demo"), "-o", "--output", help="Directory for the model, quantized files "
                                "and tables (re-running reuses them)."),
    threads: Threads = None,
    n_gpu_layers: GpuLayers = -1,
    quiet: Quiet = False,
) -> None:
    """Run the whole pipeline offline on a tiny built-in Llama-3-format model and show the quantization table."""
    from .. import bench as bench_mod
    from ..demo import run_demo

    def stage(description: str, unit: str):
        return progress_bar(description, unit=unit, quiet=quiet)

    result = run_demo(output, stage=stage, threads=threads, n_gpu_layers=n_gpu_layers,
                      on_step=lambda m: err.print(f"[bold]cl3 demo:[/] {m}"))
    out.print(bench_mod.render_rich(result.plain))
    verdicts = Table(title="importance matrix (built-in calibration text) vs plain quantization, PPL")
    for col in ("type", "plain", "imatrix", "better"):
        verdicts.add_column(col, justify="left" if col in ("type", "better") else "right")
    for type_name, plain, im, winner in result.imatrix_verdicts():
        verdicts.add_row(type_name, f"{plain:.3f}", f"{im:.3f}", winner)
    out.print(verdicts)
    out.print(f"demo model: {result.checkpoint} (HF) and {result.f16} (GGUF)")
    out.print(f"quantized models: {output / 'models'}")
    out.print(f"tables: {output / 'demo-table'}.{{md,csv,json,png}} and {output / 'demo-table-imatrix'}.*")
    out.print(f"next: cl3 chat {result.f16}   ·   cl3 export ollama {result.f16}")
