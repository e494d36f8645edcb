"""How far an approximate next-token distribution is from dense attention's: KL(dense ‖ approximate)."""

from __future__ import annotations

import torch


def kl_from_dense(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(dense_logits) ‖ softmax(logits)) in nats, computed in float64.

    Clamped at 0: KL is never negative, but for (nearly) equal distributions float rounding leaves
    values of either sign around 1e-18, and a negative KL reads as a bug to whoever sees it.
    """
    log_p = torch.log_softmax(dense_logits.double(), -1)
    log_q = torch.log_softmax(logits.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
