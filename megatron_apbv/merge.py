"""Exact log-sum-exp merge of partial attention results (spec step 4, decoding)."""

from __future__ import annotations

import torch

from megatron_apbv.kernels_dispatch import kernel_for


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
