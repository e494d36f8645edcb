"""Rank 0's progress bar over all replicas of ``apbv infer`` (stderr, only on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def progress_line(done: int, errors: int, total: int, elapsed: float, width: int = 24,
                  tokens: Optional[int] = None) -> str:
    """``[#####.....] 12/40 errors 1 | 0.52 req/s | ETA 54s``: ``done`` counts error answers too.

    With ``tokens`` (generated so far) the line ends ``| 61.3 tok/s``.
    """
    fraction = done / total if total else 1.0
    filled = round(width * fraction)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} errors {errors} | {rate:.2f} req/s | ETA {eta}"
    if tokens is not None:
        line += f" | {tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s"
    return line


class Progress:
    """Redraws one status line; silent unless ``stream`` is a terminal (and not ``quiet``)."""

    def __init__(self, total: int, *, quiet: bool = False, stream: Optional[TextIO] = None):
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = not quiet and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, errors: int, tokens: Optional[int] = None) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            self.stream.write("\r" + progress_line(done, errors, self.total, elapsed, tokens=tokens))
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
