"""`cl3 info`: what a GGUF file holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .app import app, out


@app.command()
def info(
    model: Path = typer.Argument(..., help="A .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show a GGUF's architecture, hyper-parameters, tokenizer, chat template, tensor types and size."""
    from ..metadata import read_metadata

    summary = read_metadata(model).summary()
    if as_json:
        out.print_json(json.dumps(summary, ensure_ascii=False))
        return
    table = Table(title=str(model), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in summary.items():
        if key in ("tensor_types", "hparams", "tokenizer"):
            continue
        if key == "chat_template" and value:
            value = value if len(value) <= 400 else value[:400] + " …"
        table.add_row(key, str(value))
    for key, value in summary["hparams"].items():
        table.add_row(key, str(value))
    for key, value in summary["tokenizer"].items():
        table.add_row(f"tokenizer.{key}", str(value))
    types = ", ".join(f"{t}: {n}" for t, n in summary["tensor_types"].items())
    table.add_row("tensor types", types)
    out.print(table)
