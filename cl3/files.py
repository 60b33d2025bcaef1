"""Small file helpers shared by the stages: atomic outputs and human sizes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError, OutputExistsError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or folder) beside ``path``; rename it to ``path`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary is removed, so a failed or interrupted run never
    leaves a partial output behind. A failure while the disk is full (llama.cpp reports it as a plain error) is
    reported as such.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=parent))
        else:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
            os.close(fd)
            tmp = Path(tmp_name)
    except OSError as ex:
        raise OutputError(f"cannot write to {parent}: {ex.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)  # mkstemp/mkdtemp make them private
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as ex:
        if (isinstance(ex, OSError) and ex.errno == errno.ENOSPC) or _free_bytes(parent) < 1 << 20:
            raise OutputError(f"no space left on the device while writing {path}") from None
        raise
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _free_bytes(directory: Path) -> int:
    try:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize
    except (OSError, AttributeError):
        return 1 << 62


def gib(n_bytes: int) -> float:
    return n_bytes / 1024**3


def is_directory_target(out: str | os.PathLike) -> bool:
    """An output names a folder when it is one, or when it ends with a path separator (``-o models/``)."""
    text = os.fspath(out)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def output_directory(out: str | os.PathLike) -> Path:
    """The folder ``out`` names, created when missing (with its parents)."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as ex:
        raise OutputError(f"cannot create the folder {path}: {ex.strerror}") from None
    if not path.is_dir():
        raise OutputError(f"{path} is not a folder")
    return path


def check_new_output(path: Path, force: bool) -> None:
    """Refuse to replace an existing file unless ``force``."""
    if path.exists() and not force:
        raise OutputExistsError(path)
