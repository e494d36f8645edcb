"""Progress of a long command on stderr, from rank 0 only: one class, a terminal mode and a log mode.

* terminal (stderr is a TTY): a tqdm bar, redrawn in place;
* log (a SLURM log, a pipe): plain lines a log keeps: :meth:`Progress.step` prints one line as
  each step starts, :meth:`Progress.update` at most one line every ``interval`` seconds
  (done/total, errors, requests/s, tokens/s, ETA), and :meth:`Progress.close` a last one.

Steps (``apbv eval``, ``apbv bench``) and counts (``apbv infer``'s answered requests) are the two
ways to advance it. stdout stays for results.
"""

from __future__ import annotations

import sys
import time
from typing import Optional


def progress_line(done: int, errors: int, total: int, elapsed: float, tokens: Optional[int] = None) -> str:
    """``12/40 done, errors 1 | 0.52 req/s | 61.3 tok/s | ETA 54s``: ``done`` counts error answers too."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    line = f"{done}/{total} done, errors {errors} | {rate:.2f} req/s"
    if tokens is not None:
        line += f" | {tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s"
    return line + f" | ETA {eta}"


class Progress:
    """``total`` steps (or requests) of ``desc``; silent unless ``enabled``."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None, interval: float = 30.0):
        self.total, self.desc, self.enabled, self.interval = total, desc, enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._counts: Optional[tuple[int, int, Optional[int]]] = None
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True)
        self._running = False

    @property
    def terminal(self) -> bool:
        return self.bar is not None

    def step(self, label: str) -> None:
        """Step ``label`` starts (the previous one, if any, has finished)."""
        if not self.enabled:
            return
        if self._running:
            self._finish()
        self._running = True
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        else:
            elapsed = time.monotonic() - self.started
            self.stream.write(f"{self.desc} [{self.done + 1}/{self.total}] {label} ({elapsed:.0f} s so far)\n")
            self.stream.flush()

    def update(self, done: int, errors: int = 0, tokens: Optional[int] = None, *, force: bool = False) -> None:
        """``done`` of ``total`` finished so far (``errors`` of them failed, ``tokens`` generated): the bar
        moves; off a terminal a line is printed when ``interval`` seconds passed since the last (or ``force``)."""
        if not self.enabled:
            return
        self._counts = (done, errors, tokens)
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            rate = f"{tokens / (now - self.started):.1f} tok/s" if tokens is not None and now > self.started else ""
            self.bar.set_postfix_str(f"errors {errors}" + (f", {rate}" if rate else ""), refresh=True)
        elif force or now - self._last_line >= self.interval:
            self._last_line = now
            line = progress_line(done, errors, self.total, now - self.started, tokens)
            self.stream.write(f"{self.desc}: {line} ({now - self.started:.0f} s so far)\n")
            self.stream.flush()
        self.done = done

    def note(self, text: str) -> None:
        """A one-off message (e.g. a one-time compilation), printed without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _finish(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        """The last step has finished (or the counts are final)."""
        if not self.enabled:
            return
        if self._running:
            self._finish()
            self._running = False
        if self.bar is not None:
            self.bar.close()
        elif self._counts is not None:
            self.update(*self._counts, force=True)
        else:
            self.stream.write(f"{self.desc}: {self.done}/{self.total} done in {time.monotonic() - self.started:.0f} s\n")
            self.stream.flush()
