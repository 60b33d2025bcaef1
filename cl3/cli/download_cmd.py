"""`cl3 download`: fetch what cl3 needs from the Hugging Face hub (or a mirror) or ModelScope."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, out, progress_bar
from .options import Quiet


@app.command()
def download(
    repo_id: str = typer.Argument(None, help="Hub repository, e.g. hfl/llama-3-chinese-8b-instruct-v3 (with --dataset: "
                                  "another copy of the exam than the default)."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit (default: main; master on ModelScope)."),
    source: str = typer.Option(None, "--source", help="hf (default; honours HF_ENDPOINT, e.g. https://hf-mirror.com) "
                               "or modelscope. Default from $CL3_HUB_SOURCE."),
    include: list[str] = typer.Option(None, "--include", help="Glob(s) of the files to fetch instead of cl3's set "
                                      "(config, tokenizer, safetensors + index, PEFT adapter). Repeatable."),
    output: Path = typer.Option(None, "-o", "--output", help="Put the files in this directory instead of the cache."),
    dataset: str = typer.Option(None, "--dataset", metavar="TASK", help="An exam for `cl3 eval` instead of a model: "
                                "ceval, cmmlu or mmlu (from ceval/ceval-exam, haonan-li/cmmlu, cais/mmlu), unpacked "
                                "into cl3's cache in the official layout."),
    quiet: Quiet = False,
) -> None:
    """Download a model (only the files cl3 uses) and print its local directory."""
    from ..errors import UsageError
    from ..hub import download as run_download

    if dataset is not None:
        from ..evaluation.datasets import download_dataset

        with progress_bar(f"downloading {dataset}", quiet=quiet) as update:
            path = download_dataset(dataset, repo_id=repo_id, revision=revision, progress=update)
        out.print(str(path), highlight=False, soft_wrap=True)
        return
    if repo_id is None:
        raise UsageError("name a hub repository (or an exam with --dataset)")

    with progress_bar(f"downloading {repo_id}", quiet=quiet) as update:
        path = run_download(repo_id, revision=revision, source=source, include=include or None, out=output,
                            progress=update)
    out.print(str(path), highlight=False, soft_wrap=True)
