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
