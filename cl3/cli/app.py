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
from typer.core import TyperArgument, TyperCommand, TyperOption

from .. import __version__


class Cl3Command(TyperCommand):
    """A command whose help shows metavars (N, FILE, TYPE), never Python type names (<int>, <list[str]>)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain_help(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_help(option)
        return option


_METAVARS = {"int": "N", "float": "X", "str": "TEXT", "Path": "PATH"}


def _plain_help(param) -> None:
    if isinstance(param, TyperArgument) or getattr(param, "is_flag", False):
        param.display_type_rich = lambda ctx=None: None
    elif isinstance(param, TyperOption) and param.metavar is None:
        param.metavar = _METAVARS.get(param.bare_type().removeprefix("list[").removesuffix("]"), "VALUE")
    elif not isinstance(param, TyperOption):  # click's own help option
        param.display_type_rich = lambda ctx=None: None


BUILTIN_IMATRIX = ":builtin:"  # what a bare `--imatrix` (no file) becomes


class BareImatrixCommand(Cl3Command):
    """Let `--imatrix` be given without a value (then cl3 computes one on its built-in calibration text)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--imatrix" and (i + 1 == len(args) or args[i + 1].startswith("-")
                                       or _is_type_name(args[i + 1])):
                fixed.append(BUILTIN_IMATRIX)
        return super().parse_args(ctx, fixed)


def _is_type_name(arg: str) -> bool:
    """`cl3 quantize M --imatrix Q4_K_M`: a type name that is not a file follows a bare --imatrix."""
    if os.path.exists(arg):
        return False
    from ..quantize import file_type_names

    names = {n.upper() for n in file_type_names()}
    return all(part.strip().upper() in names for part in arg.split(",") if part.strip())


def imatrix_choice(value: str | None) -> str | bool | None:
    """``--imatrix`` as the library takes it: a file, True (compute on the built-in text) or None."""
    return True if value == BUILTIN_IMATRIX else value


class Cl3Typer(typer.Typer):
    """Every command of the app is a :class:`Cl3Command` unless it names its own class."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Cl3Command, **kwargs)


app = Cl3Typer(
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
    """A Rich Progress shown from its first update on, so an error found before any work prints no empty bar.
    When stderr is not a terminal (a log, CI) it prints plain lines instead (cl3.progress.ProgressLines): one as
    each task starts, periodic ones with the time left, one as it ends."""

    def __enter__(self) -> LazyProgress:
        self._lines: dict = {}
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.live.is_started:
            self.stop()
        for lines in getattr(self, "_lines", {}).values():
            lines.close(failed=exc_type is not None)

    def update(self, task_id, *args, **kwargs) -> None:
        if self.disable or self.console.is_terminal:
            if not self.live.is_started:
                self.start()
            super().update(task_id, *args, **kwargs)
            return
        super().update(task_id, *args, **kwargs)
        task = self._tasks[task_id]
        lines = self._lines.get(task_id) if hasattr(self, "_lines") else None
        if lines is None:
            from ..progress import ProgressLines

            unit = "bytes" if any(isinstance(c, DownloadColumn) for c in self.columns) else ""
            lines = ProgressLines(task.description or "working", self._print_line, unit=unit)
            if hasattr(self, "_lines"):
                self._lines[task_id] = lines
        if "completed" in kwargs or "total" in kwargs:
            lines.update(task.completed, task.total)

    def _print_line(self, line: str) -> None:
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)


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
    from ..template_budget import TemplateBudgetError

    try:
        findings = check_gguf(model, chat_template)
    except TemplateBudgetError as ex:  # the output is written; its template is what would fail elsewhere
        err.print(f"check: error: {ex}", highlight=False, markup=False, soft_wrap=True)
        return
    for finding in findings:
        if finding.level in ("warning", "error"):
            err.print(f"check: {finding.line()}", highlight=False, markup=False, soft_wrap=True)
