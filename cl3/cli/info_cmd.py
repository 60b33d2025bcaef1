"""`cl3 info`: what a GGUF file holds; `--check`: what would make chats loop, get cut off or lose their format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import app, out


@app.command()
def info(
    model: Path = typer.Argument(..., help="A .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    check: bool = typer.Option(False, "--check", help="Check the chat template (renders; its end-of-turn token ends "
                               "generation; no double BOS), the stops an Ollama export writes, the pre-tokenizer and "
                               "rope scaling: one line per finding with its fix. Exit status 1 when a finding is an "
                               "error, 0 otherwise (warnings and notes included)."),
    chat_template: Annotated[Optional[str], typer.Option(
        "--chat-template", metavar="NAME|FILE", help="With --check: check this template (a name or a Jinja file) "
                                                     "instead of the GGUF's.")] = None,
) -> None:
    """Show a GGUF's architecture, hyper-parameters, tokenizer, chat template (and where it came from), tensor types
    and size."""
    if check:
        from ..check import check_gguf, has_errors

        findings = check_gguf(model, chat_template)
        if as_json:
            out.print_json(json.dumps([f.__dict__ for f in findings], ensure_ascii=False))
        else:
            for finding in findings:
                out.print(finding.line(), highlight=False, markup=False, soft_wrap=True)
        if has_errors(findings):
            raise typer.Exit(1)
        return

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
