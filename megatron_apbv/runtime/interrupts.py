"""Ctrl-C and ``kill``: every rank says "interrupted" in one line and exits 128 + the signal, no tracebacks.

A terminal's Ctrl-C sends SIGINT to the launcher and every rank; the DeepSpeed
launcher turns its SIGINT into SIGTERM for the ranks, torchrun forwards it. Python's
default turns SIGINT into a ``KeyboardInterrupt`` traceback per rank (hundreds of
lines) and lets SIGTERM kill the rank without a word. :func:`interrupts_as_exceptions`
makes both raise :class:`Interrupted` once, which the command line reports.
Files are written atomically (runtime/atomic.py), so an interrupted write leaves
the old file or none.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT or SIGTERM (a ``KeyboardInterrupt``, so ``except Exception`` lets it pass)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class InterruptState:
    signum: int | None = None  # the first signal received, if any

    @property
    def exit_code(self) -> int:
        """128 + the signal, as shells report a process ended by it (Ctrl-C: 130)."""
        return 128 + (self.signum or signal.SIGINT)


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[InterruptState]:
    """Within the block the first SIGINT/SIGTERM raises :class:`Interrupted`; later ones are only recorded.

    (Later ones: the launcher and the terminal often both signal a rank; the rank is already
    leaving.) The previous handlers come back on exit. Outside the main thread nothing is installed.
    """
    state = InterruptState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state.signum is None:
            state.signum = signum
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
