"""Small file helpers shared by the stages: atomic outputs and human sizes."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError, OutputExistsError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or folder) beside ``path``; rename it to ``path`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary is removed, so a failed or interrupted run never
    leaves a partial output behind. A failure while the disk is full (llama.cpp reports it as a plain error) is
    reported as such. The temporary's name says which process writes it; temporaries of ``path`` whose writer is
    gone (a run killed with SIGKILL, a crash, a power cut) are removed first, with a note on the "cl3" logger.
    """
    path = Path(path)
    parent = check_output_directory(path)
    remove_stale_partials(path)
    prefix = f".{path.name}.{_writer_tag()}."
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=parent))
        else:
            fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=parent)
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


# .NAME.<host>-<pid>-<start>.<random>.partial: host = hash of the host name, start = the writer's start time
_PARTIAL_TAIL = re.compile(r"^([0-9a-f]{8})-(\d+)-(\d+)\.[A-Za-z0-9_]+\.partial$")


@functools.cache
def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _writer_tag() -> str:
    return f"{_host()}-{os.getpid()}-{_start_time(os.getpid()) or 0}"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3... of /proc/PID/stat (state, ppid, ...), None when there is no such process (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (Linux); with the PID it names one process for good."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _writer_alive(pid: int, start: int) -> bool:
    fields = _proc_stat(pid)
    if fields is not None:
        return fields[0] not in ("Z", "X") and (start == 0 or int(fields[19]) == start)  # a reused PID: gone
    if Path("/proc/self/stat").exists():
        return False
    try:  # no /proc (macOS): the PID alone, so a reused PID keeps a stale file (the safe mistake)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def stale_partials(path: str | os.PathLike) -> list[Path]:
    """Temporaries of ``path`` (atomic_output's) left by a writer on this host that no longer runs."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    start = f".{path.name}."
    found = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            m = entry.name.startswith(start) and _PARTIAL_TAIL.match(entry.name[len(start):])
            if m and m[1] == _host() and not _writer_alive(int(m[2]), int(m[3])):
                found.append(parent / entry.name)
    return sorted(found)


def remove_stale_partials(path: str | os.PathLike) -> int:
    """Remove :func:`stale_partials` of ``path``, saying so in one note; returns the bytes freed."""
    freed, removed = 0, []
    for partial in stale_partials(path):
        try:
            if partial.is_dir() and not partial.is_symlink():
                size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
                shutil.rmtree(partial)
            else:
                size = partial.lstat().st_size
                partial.unlink()
        except OSError:
            continue
        freed += size
        removed.append(partial.name)
    if removed:
        what = removed[0] if len(removed) == 1 else f"{len(removed)} unfinished files"
        logging.getLogger("cl3").warning("removed %s (%s) left in %s by an earlier run that was killed", what,
                                         _size_text(freed), Path(path).parent)
    return freed


def _size_text(n_bytes: int) -> str:
    if n_bytes < 1000:
        return f"{n_bytes} bytes"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n_bytes < scale * 1000 or unit == "GB":
            return f"{n_bytes / scale:.1f} {unit}"
    return ""


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
        make_folder(path)
    except OSError as ex:
        raise OutputError(f"cannot create the folder {path}: {ex.strerror}") from None
    if not path.is_dir():
        raise OutputError(f"{path} is not a folder")
    return path


_created: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("cl3_created_folders", default=None)


def make_folder(path: str | os.PathLike) -> Path:
    """``mkdir -p``; inside :func:`removing_created_folders`, the folders it made are remembered."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    if (created := _created.get()) is not None:
        created.extend(reversed(missing))
    return path


@contextlib.contextmanager
def removing_created_folders() -> Iterator[None]:
    """Folders :func:`make_folder` creates in the block are removed again when the block fails and they are
    still empty (a full disk or Ctrl-C leaves no empty ``q/``, ``NAME.models/`` or LM Studio folder behind)."""
    created: list[Path] = []
    token = _created.set(created)
    try:
        yield
    except BaseException as ex:
        if not (isinstance(ex, SystemExit) and not ex.code):
            for folder in reversed(created):  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only an empty one
        raise
    finally:
        _created.reset(token)


def check_output_directory(path: str | os.PathLike) -> Path:
    """The folder ``path`` will be written in; refused when it does not exist (checked before long work starts)."""
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    return parent


def check_new_output(path: Path, force: bool) -> None:
    """Refuse to replace an existing file unless ``force``."""
    if path.exists() and not force:
        raise OutputExistsError(path)
