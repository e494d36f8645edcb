"""eval/oracle.py's per-KV-head attention over visible keys equals attention under the reference's explicit mask."""

import math

import pytest
import torch

from megatron_apbv.apbv.reference import apbv_attention_reference, dense_attention_reference
from megatron_apbv.eval.oracle import MaskedOracleAttention


def _oracle(settings):
    """The oracle module without a Megatron config (only its attention is used)."""
    module = MaskedOracleAttention.__new__(MaskedOracleAttention)
    torch.nn.Module.__init__(module)
    module.settings, module.layer_number, module.softmax_scale = settings, 1, 1 / math.sqrt(8)
    return module


@pytest.mark.parametrize("settings", [
    {},
    dict(mode="apbv", world_size=2, anchor_len=5, query_len=4, passing_len=3, zigzag=True, window=3),
    dict(mode="apbv", world_size=3, anchor_len=0, query_len=2, passing_len=0, zigzag=True, window=5),
    dict(mode="apbv", world_size=2, anchor_len=7, query_len=3, passing_len=2, zigzag=False, window=1,
         selection="max"),
    dict(mode="apbv", world_size=4, anchor_len=3, query_len=5, passing_len=4, zigzag=True, window=5,
         selection="softmax"),
    dict(mode="apbv", world_size=2, anchor_len=4, query_len=3, passing_len=10**6, zigzag=True, window=5),
])
def test_visible_keys_attention_equals_float64_reference(settings):
    g = torch.Generator().manual_seed(3)
    s, hq, hkv, d, b = 53, 6, 2, 8, 2
    q, k, v = (torch.randn(s, b, h, d, generator=g) for h in (hq, hkv, hkv))
    out = _oracle(settings).forward(q, k, v, None).reshape(s, b, hq, d)
    for i in range(b):
        if not settings:
            ref = dense_attention_reference(q[:, i], k[:, i], v[:, i], softmax_scale=1 / math.sqrt(8))
        else:
            opts = {key: val for key, val in settings.items() if key != "mode"}
            ref = apbv_attention_reference(q[:, i], k[:, i], v[:, i], softmax_scale=1 / math.sqrt(8), **opts)
        torch.testing.assert_close(out[:, i], ref, atol=1e-5, rtol=1e-5)


def test_subclass_that_reads_the_mask_gets_the_same_attention():
    """Benchmarks that inspect example_mask (needle_selection_rules.py) take the explicit-mask path: same output."""
    settings = dict(mode="apbv", world_size=2, anchor_len=5, query_len=4, passing_len=3, zigzag=True, window=3)

    class Reading(MaskedOracleAttention):
        def example_mask(self, index, query, key):
            return super().example_mask(index, query, key)

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(41, 1, h, 8, generator=g) for h in (6, 2, 2))
    plain = _oracle(settings).forward(q, k, v, None)
    reading = Reading.__new__(Reading)
    reading.__dict__.update(_oracle(settings).__dict__)
    torch.testing.assert_close(reading.forward(q, k, v, None), plain, atol=1e-5, rtol=1e-5)
