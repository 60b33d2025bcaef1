"""`cl3 eval`: multiple-choice accuracy (C-Eval, CMMLU, MMLU) the model authors' way, optionally against a baseline."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import app, out, progress_bar
from .options import BatchSize, CtxSize, Force, GpuLayers, Json, Output, Quiet, Threads


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="GGUF model.")],
    task: Annotated[str, typer.Option("--task", metavar="TASK", help="ceval, cmmlu, mmlu (fetched by `cl3 download "
                                      "--dataset TASK`) or a folder in one of their official layouts.")] = "ceval",
    split: Annotated[Optional[str], typer.Option("--split", metavar="SPLIT", help="dev, val or test (default: "
                                                 "C-Eval val, CMMLU test, MMLU test).")] = None,
    shots: Annotated[int, typer.Option("--shots", metavar="K", help="Dev examples before each question.")] = 5,
    subjects: Annotated[Optional[list[str]], typer.Option(
        "--subjects", metavar="NAME", help="Only these subjects (comma-separated or repeated).")] = None,
    template: Annotated[str, typer.Option(
        "--template", metavar="T", help="none (plain prompt), model (the GGUF's chat template), alpaca3 / alpaca2 (the "
                                        "authors' own Llama-3 / Llama-2 chat strings), a template name or a Jinja "
                                        "file.")] = "none",
    prompts: Annotated[str, typer.Option(
        "--prompts", metavar="STYLE", help="alpaca3: as Chinese-LLaMA-Alpaca-3's scripts (the header always, Chinese "
                                           "subject names); alpaca2: as -2's (Chinese-LLaMA-2 tables: no header "
                                           "zero-shot, the subject's file name).")] = "alpaca3",
    limit: Annotated[Optional[int], typer.Option("--limit", metavar="N",
                                                 help="At most N questions per subject.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(
        "--baseline", metavar="F16.gguf|RUN.json", help="Compare with this model (evaluated the same way) or saved "
                                                        "run: paired accuracy difference and flips.")] = None,
    ctx_size: CtxSize = 4096,
    batch_size: BatchSize = 2048,
    parallel: Annotated[int, typer.Option("--parallel", metavar="N", help="Questions decoded side by side.")] = 4,
    no_prefix_reuse: Annotated[bool, typer.Option("--no-prefix-reuse", help="Decode every prompt whole (slower; "
                                                  "for comparison).")] = False,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = -1,
    output: Output = None,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Accuracy of MODEL on C-Eval, CMMLU or MMLU: the authors' prompts and constrained decoding, resumable."""
    from ..evaluation.run import EvalRequest, compare, evaluate, open_baseline

    chosen = tuple(s.strip() for item in subjects or [] for s in item.split(",") if s.strip())
    request = EvalRequest(model, task=task, split=split, shots=shots, subjects=chosen, template=template, style=prompts,
                          limit=limit,
                          n_ctx=ctx_size, n_batch=batch_size, n_parallel=parallel, threads=threads,
                          n_gpu_layers=n_gpu_layers, reuse_prefix=not no_prefix_reuse,
                          output=output, force=force)
    base = open_baseline(baseline) if baseline is not None else None
    with progress_bar(f"eval {model.name}", unit="questions", quiet=quiet or as_json) as update:
        run = evaluate(request, progress=update)
    comparison = None
    if baseline is not None:
        if base is None:
            with progress_bar(f"eval {baseline.name}", unit="questions", quiet=quiet or as_json) as update:
                base = evaluate(replace(request, model=baseline, output=None), progress=update)
        comparison = compare(run, base) | {"baseline_run": str(baseline)}
    if as_json:
        out.print_json(json.dumps(run.to_dict() | {"file": str(run.path), "paired": comparison}))
        return
    _print_run(run)
    if comparison is not None:
        _print_paired(comparison)
    out.print(f"answers and choice scores: {run.path}", highlight=False)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _print_run(run) -> None:
    s, settings = run.summary, run.settings
    table = Table(title=f"{Path(settings['model']).name}: {settings['task']} {settings['split']}, "
                        f"{settings['shots']}-shot, template {settings['template']}")
    for name in ("", "questions", "accuracy %", "± se"):
        table.add_column(name, justify="left" if not name else "right")
    rows = list(s.subjects.items()) if len(s.subjects) <= 12 else []
    for name, a in rows:
        table.add_row(name, str(a.n), _pct(a.accuracy), _pct(a.se))
    if rows:
        table.add_section()
    for name, a in s.categories.items():
        table.add_row(name, str(a.n), _pct(a.accuracy), _pct(a.se))
    table.add_section()
    table.add_row("[bold]all (over questions)[/]", str(s.overall.n), f"[bold]{_pct(s.overall.accuracy)}[/]",
                  _pct(s.overall.se))
    table.add_row(f"all (over {s.over_subjects.n} subjects)", str(s.overall.n), _pct(s.over_subjects.accuracy),
                  _pct(s.over_subjects.se))
    out.print(table)
    out.print(f"{run.seconds:.1f} s scoring", highlight=False)


def _print_paired(p: dict) -> None:
    out.print(f"vs {p['baseline_run']}: {_pct(p['accuracy'])} vs {_pct(p['baseline'])} %, difference "
              f"{100 * p['difference']:+.2f} ± {_pct(p['se'])} points (paired, {p['n']} questions); "
              f"{p['flips']} answers changed (flip rate {_pct(p['flip_rate'])} %: {p['gained']} right now, "
              f"{p['lost']} wrong now)", highlight=False, soft_wrap=True)
