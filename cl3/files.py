"""Small file helpers shared by the stages: atomic outputs and human sizes."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file is removed, so a failed or
    interrupted run never leaves a partial output behind.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    except OSError as ex:
        raise OutputError(f"cannot write to {parent}: {ex.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as ex:
        if ex.errno == errno.ENOSPC:
            raise OutputError(f"no space left on the device while writing {path}") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def gib(n_bytes: int) -> float:
    return n_bytes / 1024**3
