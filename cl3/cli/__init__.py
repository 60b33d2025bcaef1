"""The `cl3` command line: argument parsing and printing only; the work happens in the library modules.

Every cl3.errors.Cl3Error, and every usage error, becomes one `error:` line on stderr and a non-zero exit code; set
CL3_DEBUG=1 to see tracebacks. Notes the library logs (logger "cl3", e.g. the AMX fallback) print as `note:` lines.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.markup import escape

from ..errors import Cl3Error, Interrupted
from ..files import removing_created_folders

# Each module registers its commands on the app; the import order is the order `cl3 --help` lists them (pipeline order).
# isort: off
from . import download_cmd, merge_cmd  # noqa: F401
from . import convert_cmd, info_cmd  # noqa: F401
from . import imatrix_cmd, quantize_cmd  # noqa: F401
from . import measure_cmd, eval_cmd, bench_cmd, demo_cmd  # noqa: F401
from . import chat_cmd, serve_cmd, export_cmd  # noqa: F401
from . import doctor_cmd  # noqa: F401
# isort: on

from .app import app, err
from .options import hint, modern_argv

# click's exceptions, wherever this typer release keeps click (vendored as typer._click in recent ones)
_click = sys.modules[typer.BadParameter.__module__]


class _Failed(Exception):
    """A command that ended with a non-zero code: the folders it created, if empty, go."""


class _NoteHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]note:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("CL3_DEBUG") == "1"
    logger = logging.getLogger("cl3")
    if not logger.handlers:
        logger.addHandler(_NoteHandler())
        logger.propagate = False
    args = modern_argv(sys.argv[1:] if argv is None else list(argv))
    try:
        with removing_created_folders():
            code = app(args=args, prog_name="cl3", standalone_mode=False)
            if code:  # typer's Ctrl-C and usage exits return a code
                raise _Failed
    except _Failed:
        pass
    except Interrupted as ex:
        err.print(f"interrupted: {escape(str(ex))}", highlight=False, soft_wrap=True)
        sys.exit(ex.exit_code)
    except Cl3Error as ex:
        if debug:
            raise
        extra = hint(ex.param)
        _error(f"{ex} ({extra})" if extra else str(ex))
        sys.exit(ex.exit_code)
    except _click.UsageError as ex:
        if type(ex).__name__ == "NoArgsIsHelpError":  # `cl3` or `cl3 export` alone: the help
            ex.show()
            sys.exit(2)
        command = ex.ctx.command_path if ex.ctx is not None else "cl3"
        _error(f"{ex.format_message()} (see `{command} --help`)")
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        sys.exit(130)
    except _click.ClickException as ex:
        _error(ex.format_message())
        sys.exit(ex.exit_code)
    except Exception as ex:  # a bug in cl3: still one line, the traceback on request
        if debug:
            raise
        _error(f"internal error: {type(ex).__name__}: {ex} (set CL3_DEBUG=1 for the traceback)", label="")
        sys.exit(70)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        err.print("interrupted")
    sys.exit(code or 0)


def _error(message: str, label: str = "error: ") -> None:
    text = f"[bold red]{label}[/]{escape(message)}" if label else f"[bold red]{escape(message)}[/]"
    err.print(text, highlight=False, soft_wrap=True)
