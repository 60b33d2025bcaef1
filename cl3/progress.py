"""How the library reports long work without printing: a *stage* opens a progress report for one step.

``stage(description, unit)`` is a context manager yielding ``update(done, total)``; the CLI passes one that draws a
Rich progress bar (unit "bytes", "chunks", "tensors", "runs"), tests and other callers pass their own or nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

Progress = Callable[[int, int], None]
Stage = Callable[[str, str], AbstractContextManager[Progress]]


@contextlib.contextmanager
def stage_progress(stage: Stage | None, description: str, unit: str) -> Iterator[Progress | None]:
    """The update callback of one step, or None when nobody listens."""
    if stage is None:
        yield None
    else:
        with stage(description, unit) as update:
            yield update


@contextlib.contextmanager
def quiet_logger(name: str = "gguf") -> Iterator[None]:
    """gguf-py's warnings (vocabulary details, metadata guesses) not on the user's terminal while the block runs;
    the logger's level is restored afterwards, so an application that configures logging keeps its setting."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
