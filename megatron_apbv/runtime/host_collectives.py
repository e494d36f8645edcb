"""Small collectives over host values (flags, seconds): the one home of the helpers every layer shares.

Each is a single ``all_reduce`` on a tensor of a few numbers, placed where the group's backend
can move it (:func:`collective_device`). They inherit the process group's timeout
(``parallel.timeout_seconds``), so a missing peer fails them instead of hanging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group=None) -> torch.device:
    """Where ``group``'s collectives take tensors: NCCL moves only CUDA tensors (the rank's current device),
    gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max(values: list[float], device: torch.device, group=None) -> list[float]:
    """The element-wise maximum of every rank's ``values`` (the same length on every rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def any_rank(flag: bool, device: torch.device, group=None) -> bool:
    """Whether ``flag`` is true on any rank of ``group`` (every rank asks at the same point); a group of one
    answers without a collective."""
    if dist.get_world_size(group) == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
