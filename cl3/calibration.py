"""The texts cl3 feeds llama.cpp: the built-in bilingual calibration and evaluation sets, and users' own files.

The built-in sets live in ``cl3/data/calibration/*.txt`` and ``cl3/data/evaluation/*.txt`` (concatenated in file-name
order; see the README in each folder for what they contain). They are disjoint: calibration text drives the importance
matrix, evaluation text measures perplexity.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from .errors import InputError

CALIBRATION = "calibration"
EVALUATION = "evaluation"


@functools.cache
def _builtin(kind: str) -> str:
    folder = resources.files("cl3") / "data" / kind
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
    if not files:
        raise InputError(f"the built-in {kind} text is missing from this cl3 installation")
    text = "".join(_with_newline(f.read_text(encoding="utf-8")) for f in files)
    return text[:-1]  # as if read by llama.cpp's -f, which drops one trailing newline


def builtin_parts(kind: str) -> list[str]:
    """The built-in text of ``kind`` file by file (each a language and kind of text: code, English prose ...)."""
    folder = resources.files("cl3") / "data" / kind
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
    return [f.read_text(encoding="utf-8").strip("\n") for f in files]


def spread_windows(parts: list[str], windows: int, window_chars: int) -> str:
    """``windows`` stretches of about ``window_chars`` (whole paragraphs) spread over ``parts``: every part gets
    some while there are enough (more to the longer ones), evenly placed inside it; fewer windows than parts take
    parts spread over the list. A short calibration then still sees every language and kind of text."""
    n = len(parts)
    if windows < n:
        counts = [0] * n
        for i in {round(x) for x in [k * (n - 1) / max(1, windows - 1) for k in range(windows)]}:
            counts[i] = 1
    else:
        total = sum(len(p) for p in parts)
        share = [(windows - n) * len(p) / total for p in parts]
        counts = [1 + int(x) for x in share]
        for i in sorted(range(n), key=lambda i: int(share[i]) - share[i])[: windows - sum(counts)]:
            counts[i] += 1
    out = []
    for part, count in zip(parts, counts):
        paragraphs = part.split("\n\n")
        starts, at = [], 0
        for p in paragraphs:
            starts.append(at)
            at += len(p) + 2
        for k in range(count):
            i = next((j for j, s in enumerate(starts) if s >= (k + 0.5) * len(part) / count - window_chars / 2), 0)
            window, size = [], 0
            while i < len(paragraphs) and size < window_chars:
                window.append(paragraphs[i])
                size += len(paragraphs[i]) + 2
                i += 1
            out.append("\n\n".join(window))
    return "\n\n".join(out)


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def calibration_text() -> str:
    """The built-in calibration text (Chinese and English prose, code, dialogue, numbers, lists)."""
    return _builtin(CALIBRATION)


def evaluation_text() -> str:
    """The built-in evaluation text for perplexity, disjoint from the calibration text."""
    return _builtin(EVALUATION)


def builtin_name(kind: str) -> str:
    """A dataset name for the built-in text that changes whenever the text does, e.g. ``cl3:calibration@1a2b3c4d``."""
    digest = hashlib.sha256(_builtin(kind).encode("utf-8")).hexdigest()[:8]
    return f"cl3:{kind}@{digest}"


def read_text_files(paths: Iterable[str | os.PathLike]) -> str:
    """Users' own text files, UTF-8, concatenated in the given order.

    Like llama.cpp's ``-f``, a single trailing newline of the whole text is dropped.
    """
    parts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise InputError(f"text file not found: {path}")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{path} is not UTF-8 text") from None
        except OSError as ex:
            raise InputError(f"cannot read {path}: {ex.strerror}") from None
    text = "".join(_with_newline(p) for p in parts[:-1]) + (parts[-1] if parts else "")
    return text.removesuffix("\n")
