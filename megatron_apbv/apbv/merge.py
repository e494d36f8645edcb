"""Exact log-sum-exp merge of partial attention results (docs/design.md §3 step 4, §5)."""

from __future__ import annotations

import torch

from megatron_apbv.apbv.collectives import all_gather_stacked
from megatron_apbv.apbv.kernels_dispatch import kernel_for


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``W`` partial attentions over disjoint key sets into the attention over their union.

    ``outs`` ``[W, sq, b, h, d]``, ``lses`` ``[W, b, h, sq]`` (fp32). A partial with
    ``lse = -inf`` saw no key and contributes nothing; if all are ``-inf`` the
    result is ``out = 0``, ``lse = -inf``. Returns ``(out [sq, b, h, d], lse [b, h, sq])``.
    """
    kernel = kernel_for("merge_partials", outs)
    if kernel is not None:
        return kernel(outs, lses)
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse.clamp_min(torch.finfo(torch.float32).min))  # [W, b, h, sq]
    out = torch.einsum("wbhs,wsbhd->sbhd", weights, outs.float())
    return out.to(outs.dtype), lse


def merge_pair(out_a, lse_a, out_b, lse_b, *, out=None, lse=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_partials` of two partials held in separate tensors, written into ``out`` / ``lse`` if given.

    The kernel reads both in place (no stacking copy); ``out`` / ``lse`` may be row
    slices of a larger result.
    """
    kernel = kernel_for("merge_pair", out_a)
    if kernel is not None:
        return kernel(out_a, lse_a, out_b, lse_b, out=out, lse=lse)
    merged, merged_lse = merge_partials(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))
    if out is None:
        return merged, merged_lse
    out.copy_(merged)
    lse.copy_(merged_lse)
    return out, lse


class MergeAcrossRanks:
    """All-gather each rank's partial ``(out, lse)`` of the same query rows, then merge them.

    ``start`` may run asynchronously so that the exchange overlaps later work;
    both halves travel in one fp32 buffer ``[sq, b, h, d + 1]``, one collective.
    """

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, world: int, group, *, async_op: bool):
        self.dtype = out.dtype
        packed = torch.cat([out.float(), lse.permute(2, 0, 1).unsqueeze(-1)], dim=-1)
        self._gathered, self._handle = all_gather_stacked(packed, world, group, async_op=async_op)

    def result(self) -> torch.Tensor:
        """The exact attention of the rows over the union of all ranks' keys, ``[sq, b, h, d]``."""
        if self._handle is not None:
            self._handle.wait()
        gathered = self._gathered
        out, _ = merge_partials(gathered[..., :-1], gathered[..., -1].permute(0, 2, 3, 1))
        return out.to(self.dtype)
