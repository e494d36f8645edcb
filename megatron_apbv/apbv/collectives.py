"""Collective wrappers shared by the passing exchange, the query merge and decoding."""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.13 renamed all_gather_into_tensor; the GPU image (torch 2.11) has the old name only.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_stacked(tensor: torch.Tensor, world: int, group, *, async_op: bool):
    """All-gather into a new ``[world, *tensor.shape]`` tensor; returns ``(tensor, handle or None)``.

    With ``world == 1`` nothing is communicated.
    """
    if world == 1:
        return tensor.unsqueeze(0), None
    recv = tensor.new_empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]))
    handle = _all_gather_single(recv, tensor.contiguous(), group=group, async_op=async_op)
    return recv.view((world,) + tuple(tensor.shape)), handle if async_op else None
