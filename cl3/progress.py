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


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: how long, for people."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLines:
    """Progress as plain lines, for output that is not a terminal (logs, CI): one when a stage starts, then one
    every ``every_s`` seconds or ``every_fraction`` of the work (not closer than ``min_gap_s``), each with the time
    left, and one when it ends. ``write(line)`` prints; ``clock`` is time.monotonic (tests pass their own)."""

    def __init__(self, description: str, write: Callable[[str], None], *, unit: str = "", every_s: float = 30.0,
                 every_fraction: float = 0.1, min_gap_s: float = 2.0, clock: Callable[[], float] | None = None):
        import time

        self.description, self.write, self.unit = description, write, unit
        self.every_s, self.every_fraction, self.min_gap_s = every_s, every_fraction, min_gap_s
        self.clock = clock or time.monotonic
        self.started = self.clock()
        self.first: tuple[float, float] | None = None   # (time, done) of the first update: the rate excludes setup
        self.last_time, self.last_fraction = self.started, 0.0
        self.done, self.total = 0.0, None
        self.write(f"{description}: started")

    def update(self, done: float, total: float | None) -> None:
        now = self.clock()
        self.done, self.total = done, total
        if self.first is None:
            self.first = (now, done)
        if not total:
            if now - self.last_time >= self.every_s:
                self._line(now, f"{self._amount(done)} so far")
            return
        fraction = min(1.0, done / total)
        if fraction >= 1.0:
            return  # the closing line says it
        gap = now - self.last_time
        if gap >= self.every_s or (fraction - self.last_fraction >= self.every_fraction - 1e-9 and gap >= self.min_gap_s):
            self.last_fraction = fraction
            self._line(now, f"{self._amount(done)}/{self._amount(total)} ({100 * fraction:.0f} %)")

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the rate since the first update, or None before there is a rate."""
        now = self.clock() if now is None else now
        if not self.total or self.first is None or self.done <= self.first[1] or now <= self.first[0]:
            return None
        rate = (self.done - self.first[1]) / (now - self.first[0])
        return max(0.0, (self.total - self.done) / rate)

    def close(self, failed: bool = False) -> None:
        now = self.clock()
        what = f"{self._amount(self.done)}/{self._amount(self.total)}" if self.total else self._amount(self.done)
        self.write(f"{self.description}: {'stopped at' if failed else 'done,'} {what} in "
                   f"{duration(now - self.started)}")

    def _line(self, now: float, what: str) -> None:
        self.last_time = now
        eta = self.eta(now)
        left = f", about {duration(eta)} left" if eta is not None else ""
        self.write(f"{self.description}: {what}, {duration(now - self.started)} elapsed{left}")

    def _amount(self, n: float | None) -> str:
        if n is None:
            return "?"
        if self.unit == "bytes":
            return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
        return f"{int(n)}"
