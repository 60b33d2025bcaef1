"""The `cl3` command line: argument parsing and printing only; the work happens in the library modules.

Every cl3.errors.Cl3Error becomes one line on stderr and a non-zero exit code; set CL3_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from ..errors import Cl3Error

# Each module registers its commands on the app; the import order is the order `cl3 --help` lists them (pipeline order).
from . import download_cmd, merge_cmd  # noqa: F401, I001
from . import convert_cmd, info_cmd  # noqa: F401
from . import imatrix_cmd, quantize_cmd  # noqa: F401
from . import measure_cmd, bench_cmd, demo_cmd  # noqa: F401
from . import chat_cmd, serve_cmd, export_cmd  # noqa: F401

from .app import app, err


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("CL3_DEBUG") == "1"
    try:
        app(args=argv, prog_name="cl3")
    except Cl3Error as ex:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(str(ex))}", highlight=False, soft_wrap=True)
        sys.exit(ex.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as ex:  # a bug in cl3: still one line, the traceback on request
        if debug:
            raise
        err.print(f"[bold red]internal error:[/] {type(ex).__name__}: {escape(str(ex))} (set CL3_DEBUG=1 for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(70)
