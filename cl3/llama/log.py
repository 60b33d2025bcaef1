"""llama.cpp's log, kept (not printed) so errors can quote it; ``CL3_LLAMA_LOG=1`` prints it as it comes."""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator

GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

_lines: collections.deque[tuple[int, int, str]] = collections.deque(maxlen=400)  # (serial, level, line)
_serial = [0]
_partial = [""]
_callback = None  # the ctypes callback must stay alive
_listeners: list[Callable[[str], None]] = []


def install(llama_cpp) -> None:
    """Route llama.cpp's log into this module (called once, by library.llama_cpp()).

    llama.cpp may still log while Python shuts down (a Llama object freed by the garbage collector): from the
    atexit stage on the callback returns at once, and it is never freed, so C never calls a dead pointer.
    """
    global _callback
    echo = os.environ.get("CL3_LLAMA_LOG") == "1"
    last_level = [0]
    finishing = [False]

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if finishing[0]:
            return
        message = text.decode("utf-8", errors="replace") if text else ""
        if level == GGML_LOG_LEVEL_CONT:
            level = last_level[0]
        last_level[0] = level
        if echo:
            sys.stderr.write(message)
        _partial[0] += message
        if "\n" in _partial[0]:
            *lines, _partial[0] = _partial[0].split("\n")
            for line in lines:
                if line.strip():
                    _serial[0] += 1
                    _lines.append((_serial[0], level, line))
                    for listener in list(_listeners):  # a copy: others may unsubscribe
                        listener(line)

    _callback = on_log
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(on_log))
    atexit.register(finishing.__setitem__, 0, True)
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))


def _ready() -> None:
    from .library import llama_cpp

    llama_cpp()


@contextlib.contextmanager
def log_listener(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener(line)`` for every complete llama.cpp log line while the block runs."""
    _ready()
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def mark_log() -> int:
    """A position in llama.cpp's log; pass it to :func:`log_errors_since`."""
    _ready()
    return _serial[0]


def log_errors_since(mark: int, last: int = 2) -> str:
    """The last error lines llama.cpp logged since ``mark``, joined into one line (for exception messages)."""
    errors = [text.strip(" =\t") for serial, level, text in list(_lines)
              if serial > mark and level == GGML_LOG_LEVEL_ERROR]
    return "; ".join([e for e in errors if e][-last:])


def log_lines_since(mark: int) -> list[str]:
    """Every log line since ``mark`` (any level)."""
    return [text for serial, _level, text in list(_lines) if serial > mark]
