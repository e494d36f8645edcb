"""Progress of a long command, on stderr, from rank 0 only.

In a terminal a tqdm bar; otherwise (a SLURM log, a pipe) one plain line as each step starts, so a
log shows which step is running and how long the run has taken so far. stdout stays for results.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``total`` steps of ``desc``; call :meth:`step` as each starts and :meth:`close` at the end."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True)
        self._running = False

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
        """The last step has finished."""
        if not self.enabled:
            return
        if self._running:
            self._finish()
            self._running = False
        if self.bar is not None:
            self.bar.close()
        else:
            self.stream.write(f"{self.desc}: {self.done}/{self.total} done in {time.monotonic() - self.started:.0f} s\n")
            self.stream.flush()
