"""`cl3 serve`: an OpenAI-compatible HTTP API for a GGUF (llama-cpp-python's server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .app import app, err
from .options import ChatTemplate, GpuLayers, Threads


@app.command()
def serve(
    model: Path = typer.Argument(..., help="A .gguf file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Listen address (loopback by default; use 0.0.0.0 to "
                             "expose it, preferably with --api-key)."),
    port: int = typer.Option(8000, "--port", help="Listen port."),
    api_key: str = typer.Option(None, "--api-key", envvar="CL3_API_KEY", help="Require `Authorization: Bearer KEY` "
                                "(also from $CL3_API_KEY)."),
    ctx_size: Annotated[Optional[int], typer.Option(
        "-c", "--ctx-size", metavar="N", help="Context size (default: the training context, at most 8192).")] = None,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = -1,
    alias: str = typer.Option(None, "--alias", help="Model id shown by /v1/models (default: the file name)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's log and the server's request log."),
    chat_template: ChatTemplate = None,
    cors: Annotated[Optional[list[str]], typer.Option(
        "--cors", metavar="ORIGIN", help="Let web pages from ORIGIN (like http://localhost:3000) call the API from a "
        "browser; repeat for more. Default: no cross-origin access.")] = None,
) -> None:
    """Serve /v1/chat/completions (with streaming), /v1/completions and /v1/models, with the GGUF's chat template."""
    from ..serve import run_server, server_settings

    settings = server_settings(model, host=host, port=port, api_key=api_key, n_ctx=ctx_size, n_threads=threads,
                               n_gpu_layers=n_gpu_layers, alias=alias, verbose=verbose,
                               chat_template=chat_template, cors=cors)
    for note in settings.notes:
        err.print(f"note: {escape(note)}", highlight=False)
    err.print(f"serving {escape(settings.model.model_alias)} on http://{escape(settings.display_host)}:{port}/v1 "
              f"(chat format: {escape(settings.template_label)}); Ctrl-C stops",
              highlight=False, soft_wrap=True)
    run_server(settings)
