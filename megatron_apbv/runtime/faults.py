"""Failed ranks: a clear one-line error on the survivors.

When a rank raises, is killed or hangs mid-prefill, its peers are left inside a
collective. Gloo fails them at once when the dead peer's sockets close, or after
``parallel.timeout_seconds`` when the peer is alive but stuck; NCCL's watchdog
does the same on GPUs. :func:`report_failure` turns what they raise into one line,

    apbv: rank 0: collective failed (a peer rank exited): <first line of the error>
    apbv: rank 0: collective failed (timed out after 20 s: a peer rank is stuck or ...): <first line>

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


# What the backends say when the wait ran out, and when the peer's end of a connection went away.
_TIMEOUT_MARKERS = ("timed out", "timeout", "deadline exceeded")
_PEER_GONE_MARKERS = ("connection closed", "connection reset", "broken pipe", "connection refused",
                      "end of file", "eof", "peer closed", "socket closed")


def collective_failure_cause(err: BaseException, timeout_seconds: Optional[int]) -> str:
    """Which happened: the collective timed out (a peer is stuck or slow), or a peer rank exited.

    Gloo reports a dead peer at once (its sockets close) and a live but stuck one only when
    ``parallel.timeout_seconds`` runs out, so the error's words tell the two apart.
    """
    text = str(err).lower()
    if any(marker in text for marker in _TIMEOUT_MARKERS):
        after = f" after {timeout_seconds} s" if timeout_seconds is not None else ""
        return f"timed out{after}: a peer rank is stuck or slower than parallel.timeout_seconds"
    if any(marker in text for marker in _PEER_GONE_MARKERS):
        return "a peer rank exited"
    return "a peer rank exited or timed out"


def failure_message(err: BaseException, rank: int, timeout_seconds: Optional[int]) -> str:
    """The one-line report of a failed run on ``rank``."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if is_collective_failure(err):
        return f"apbv: rank {rank}: collective failed ({collective_failure_cause(err, timeout_seconds)}): {first}"
    return f"apbv: rank {rank}: failed: {type(err).__name__}: {first}"


def report_failure(err: BaseException, rank: int, timeout_seconds: Optional[int]) -> int:
    """Print the one-line report (and, for anything but a collective failure, the traceback); returns 1."""
    if not is_collective_failure(err):
        traceback.print_exception(err, file=sys.stderr)
    sys.stderr.write(failure_message(err, rank, timeout_seconds) + "\n")
    sys.stderr.flush()
    return 1
