"""Rank 0's progress bar over all replicas of ``apbv infer`` (stderr, only on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def progress_line(done: int, errors: int, total: int, elapsed: float, width: int = 24) -> str:
    """``[#####.....] 12/40 errors 1 | 0.52 req/s | ETA 54s``: ``done`` counts error answers too."""
    fraction = done / total if total else 1.0
    filled = round(width * fraction)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} errors {errors} | {rate:.2f} req/s | ETA {eta}"


class Progress:
    """Redraws one status line; silent unless ``stream`` is a terminal (and not ``quiet``)."""

    def __init__(self, total: int, *, quiet: bool = False, stream: Optional[TextIO] = None):
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = not quiet and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, errors: int) -> None:
        if self.enabled:
            self.stream.write("\r" + progress_line(done, errors, self.total, time.perf_counter() - self.start))
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
