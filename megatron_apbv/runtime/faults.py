"""Failed ranks: a clear one-line error on the survivors.

When a rank raises, is killed or hangs mid-prefill, its peers are left inside a
collective. Gloo fails them at once when the dead peer's sockets close, or after
``parallel.timeout_seconds`` when the peer is alive but stuck; NCCL's watchdog
does the same on GPUs. :func:`report_failure` turns what they raise into one line,

    apbv: rank 0: collective failed (a peer rank exited or timed out after 20 s): <first line of the error>

and the CLI exits non-zero. (The reliability tests provoke such failures with
``tests/fault_injection.py``; nothing of it is in the package.)
"""

from __future__ import annotations

import sys
import traceback
from typing import Optional

# Reporting ---------------------------------------------------------------------------

_COLLECTIVE_MARKERS = (
    "gloo", "nccl", "connection reset", "connection closed", "connection refused", "broken pipe",
    "timed out", "timeout", "socket", "store", "processgroup", "process group", "rendezvous", "watchdog",
)


def is_collective_failure(err: BaseException) -> bool:
    """True for what torch.distributed raises when a peer exited, hung or never joined."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    if isinstance(err, (RuntimeError, ConnectionError, TimeoutError)):
        text = str(err).lower()
        return any(marker in text for marker in _COLLECTIVE_MARKERS)
    return False


def failure_message(err: BaseException, rank: int, timeout_seconds: Optional[int]) -> str:
    """The one-line report of a failed run on ``rank``."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if is_collective_failure(err):
        after = f" after {timeout_seconds} s" if timeout_seconds is not None else ""
        return f"apbv: rank {rank}: collective failed (a peer rank exited or timed out{after}): {first}"
    return f"apbv: rank {rank}: failed: {type(err).__name__}: {first}"


def report_failure(err: BaseException, rank: int, timeout_seconds: Optional[int]) -> int:
    """Print the one-line report (and, for anything but a collective failure, the traceback); returns 1."""
    if not is_collective_failure(err):
        traceback.print_exception(err, file=sys.stderr)
    sys.stderr.write(failure_message(err, rank, timeout_seconds) + "\n")
    sys.stderr.flush()
    return 1
