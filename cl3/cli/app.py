"""The Typer application object and what every command shares: consoles and progress bars."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .. import __version__

app = typer.Typer(
    name="cl3",
    help="Convert, quantize, measure and chat with Llama-family models (Chinese Llama-3 first) on llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# piped output (CI logs, files) gets room for the wide quantization tables
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        import llama_cpp

        out.print(f"cl3 {__version__} (llama-cpp-python {llama_cpp.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """cl3: Llama-family models on your own desktop."""


class LazyProgress(Progress):
    """A Rich Progress shown from its first update on, so an error found before any work prints no empty bar."""

    def __enter__(self) -> LazyProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.live.is_started:
            self.stop()

    def update(self, *args, **kwargs) -> None:
        if not self.live.is_started:
            self.start()
        super().update(*args, **kwargs)


@contextlib.contextmanager
def progress_bar(description: str, *, unit: str = "bytes", quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar with ETA; yields ``update(done, total)`` for library callbacks."""
    if unit == "bytes":
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
    else:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
    with LazyProgress(*columns, console=err, transient=False, disable=quiet) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def print_problems(model, chat_template: str | None = None) -> None:
    """After convert / export: `cl3 info --check`'s warnings and errors, one line each on stderr."""
    from ..check import check_gguf

    for finding in check_gguf(model, chat_template):
        if finding.level in ("warning", "error"):
            err.print(f"check: {finding.line()}", highlight=False, markup=False, soft_wrap=True)
