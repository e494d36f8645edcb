"""Failed ranks: a clear one-line error on the survivors, and fault injection to test it.

When a rank raises, is killed or hangs mid-prefill, its peers are left inside a
collective. Gloo fails them at once when the dead peer's sockets close, or after
``parallel.timeout_seconds`` when the peer is alive but stuck; NCCL's watchdog
does the same on GPUs. :func:`report_failure` turns what they raise into one line,

    apbv: rank 0: collective failed (a peer rank exited): <first line of the error>
    apbv: rank 0: collective failed (timed out after 20 s: a peer rank is stuck or ...): <first line>

and the CLI exits non-zero.

Fault injection (tests only) is read from ONE place, the environment variable
``APBV_FAULT_INJECT``, for example::

    APBV_FAULT_INJECT="rank=1,layer=2"                  # rank 1 calls os._exit(17) as layer 2's APB-V attention starts
    APBV_FAULT_INJECT="rank=1,layer=1,action=raise"     # ... raises RuntimeError instead
    APBV_FAULT_INJECT="rank=2,layer=1,action=hang"      # ... sleeps forever (peers must time out)
    APBV_FAULT_INJECT="rank=1,layer=2,action=kill"      # ... sends itself SIGKILL
    APBV_FAULT_INJECT="rank=1,layer=2,code=5"           # exit code of action=exit

``rank`` is the global rank and ``layer`` Megatron's 1-based layer number.
Unset (the normal case), nothing is installed and nothing is checked.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

FAULT_ENV = "APBV_FAULT_INJECT"
ACTIONS = ("exit", "raise", "hang", "kill")


@dataclass(frozen=True)
class FaultSpec:
    rank: int
    layer: int
    action: str = "exit"
    code: int = 17


def parse_fault_spec(text: str) -> FaultSpec:
    """``"rank=1,layer=2[,action=exit|raise|hang|kill][,code=17]"`` -> :class:`FaultSpec`."""
    fields: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("rank", "layer", "action", "code"):
            raise ValueError(f"{FAULT_ENV}={text!r}: {item!r} is not one of rank=, layer=, action=, code=")
        fields[key.strip()] = value.strip()
    if "rank" not in fields or "layer" not in fields:
        raise ValueError(f"{FAULT_ENV}={text!r}: give at least rank=R,layer=L")
    action = fields.get("action", "exit")
    if action not in ACTIONS:
        raise ValueError(f"{FAULT_ENV}={text!r}: action must be one of {', '.join(ACTIONS)}")
    try:
        return FaultSpec(int(fields["rank"]), int(fields["layer"]), action, int(fields.get("code", 17)))
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={text!r}: rank, layer and code must be integers") from None


def fault_spec(environ=os.environ) -> Optional[FaultSpec]:
    text = environ.get(FAULT_ENV, "").strip()
    return parse_fault_spec(text) if text else None


def _global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def maybe_inject_fault(layer_number: int, spec: Optional[FaultSpec] = None) -> None:
    """Carry out the configured fault when this rank reaches ``layer_number``'s APB-V attention."""
    spec = spec if spec is not None else fault_spec()
    if spec is None or spec.layer != layer_number or spec.rank != _global_rank():
        return
    sys.stderr.write(f"apbv: rank {spec.rank}: {FAULT_ENV}: {spec.action} at layer {layer_number}\n")
    sys.stderr.flush()
    if spec.action == "exit":
        os._exit(spec.code)
    if spec.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.action == "raise":
        raise RuntimeError(f"{FAULT_ENV}: injected failure on rank {spec.rank} at layer {layer_number}")
    while True:  # hang: alive, sockets open, never answering
        time.sleep(3600)


def install_fault_hook():
    """If ``APBV_FAULT_INJECT`` is set, fire it as an APB-V attention layer starts; returns the hook handle.

    A global forward pre-hook on :class:`~megatron_apbv.apbv.attention.APBVCoreAttention`:
    the model code stays untouched, and with the variable unset nothing is installed.
    """
    spec = fault_spec()
    if spec is None:
        return None
    import torch

    from megatron_apbv.apbv.attention import APBVCoreAttention

    def hook(module, args):
        if isinstance(module, APBVCoreAttention):
            maybe_inject_fault(module.layer_number, spec)

    return torch.nn.modules.module.register_module_forward_pre_hook(hook)


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
