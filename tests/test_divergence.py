"""KL(dense ‖ approximate) against an independent float64 reference; never negative."""

import math

import torch

from megatron_apbv.inference.divergence import kl_from_dense


def _reference(p_logits: list[float], q_logits: list[float]) -> float:
    zp, zq = sum(math.exp(x) for x in p_logits), sum(math.exp(x) for x in q_logits)
    p = [math.exp(x) / zp for x in p_logits]
    q = [math.exp(x) / zq for x in q_logits]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_matches_the_definition():
    torch.manual_seed(0)
    dense, approx = torch.randn(3, 11), torch.randn(3, 11)
    got = kl_from_dense(dense, approx)
    for row in range(3):
        assert math.isclose(got[row].item(), _reference(dense[row].tolist(), approx[row].tolist()), rel_tol=1e-9)


def test_equal_distributions_give_zero_not_rounding_noise():
    torch.manual_seed(1)
    logits = torch.randn(64, 256, dtype=torch.float32) * 3
    shifted = logits + 0.1  # the same distribution up to float32 rounding: softmax is shift-invariant
    raw = (torch.log_softmax(logits.double(), -1).exp()
           * (torch.log_softmax(logits.double(), -1) - torch.log_softmax(shifted.double(), -1))).sum(-1)
    assert raw.min() < 0  # the rounding this clamp exists for
    kl = kl_from_dense(logits, shifted)
    assert (kl >= 0).all() and kl.max().item() < 1e-10
    assert torch.equal(kl, raw.clamp_min(0.0))
