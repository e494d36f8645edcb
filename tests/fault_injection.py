"""Fault injection for the reliability tests: one rank fails at one layer.

Read from the environment variable ``APBV_FAULT_INJECT``, for example::

    APBV_FAULT_INJECT="rank=1,layer=2"                  # rank 1 calls os._exit(17) as layer 2's APB-V attention starts
    APBV_FAULT_INJECT="rank=1,layer=1,action=raise"     # ... raises RuntimeError instead
    APBV_FAULT_INJECT="rank=2,layer=1,action=hang"      # ... sleeps forever (peers must time out)
    APBV_FAULT_INJECT="rank=1,layer=2,action=kill"      # ... sends itself SIGKILL
    APBV_FAULT_INJECT="rank=1,layer=2,code=5"           # exit code of action=exit

``rank`` is the global rank and ``layer`` Megatron's 1-based layer number. The
production CLI knows nothing of it: the tests start ranks through
``python tests/apbv_with_faults.py`` (or ``-m apbv_with_faults`` with tests/ on the
path), which installs the hook and then runs ``megatron_apbv.cli.main``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
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

    A global forward pre-hook on :class:`~megatron_apbv.apbv.attention.APBVCoreAttention`, installed
    only by the test entry point: the model code stays untouched.
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
