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


# Settings both paths (per example and batched) are checked at; each test adds its own after them.
SETTINGS = [
    {},
    dict(mode="apbv", world_size=2, anchor_len=5, query_len=4, passing_len=3, zigzag=True, window=3),
    dict(mode="apbv", world_size=3, anchor_len=0, query_len=2, passing_len=0, zigzag=True, window=5),
    dict(mode="apbv", world_size=2, anchor_len=7, query_len=3, passing_len=2, zigzag=False, window=1,
         selection="max"),
    dict(mode="apbv", world_size=4, anchor_len=3, query_len=5, passing_len=4, zigzag=True, window=5,
         selection="softmax"),
]


@pytest.mark.parametrize("settings", SETTINGS + [
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


BATCHED = SETTINGS + [
    dict(mode="apbv", world_size=2, anchor_len=4, query_len=3, passing_len=6, zigzag=True, window=3,
         selection="recent", recent_fraction=0.5),
    dict(mode="apbv", world_size=2, anchor_len=4, query_len=3, passing_len=5, zigzag=True, window=5,
         selection="frame", frame_start=4, frame_len=3),
    # a per-layer schedule: this module is layer 2, so it passes 1 key a block (not passing_len's 9)
    dict(mode="apbv", world_size=2, anchor_len=4, query_len=3, passing_len=9, passing_lens=(5, 1), zigzag=True,
         window=3),
]


@pytest.mark.parametrize("settings", BATCHED)
def test_batched_oracle_equals_float64_reference(settings):
    """The GPU sweep's path (batched=True, selection.py's functions) = the reference, example by example."""
    g = torch.Generator().manual_seed(5)
    s, hq, hkv, d, b = 47, 6, 2, 8, 3
    q, k, v = (torch.randn(s, b, h, d, generator=g) for h in (hq, hkv, hkv))
    module = _oracle({**settings, "batched": True})
    module.layer_number = 2
    out = module.forward(q, k, v, None).reshape(s, b, hq, d)
    for i in range(b):
        if not settings:
            ref = dense_attention_reference(q[:, i], k[:, i], v[:, i], softmax_scale=1 / math.sqrt(8))
        else:
            ref = apbv_attention_reference(q[:, i], k[:, i], v[:, i], softmax_scale=1 / math.sqrt(8),
                                           **module.reference_options())
        torch.testing.assert_close(out[:, i], ref, atol=1e-5, rtol=1e-5)


def test_query_aware_anchor_equals_its_explicit_mask():
    """replica_len=a: the blocks see the first a rows (the query-aware anchor) in place of the prompt's anchor."""
    from megatron_apbv.apbv.reference import apbv_mask_reference, masked_attention_reference

    settings = dict(mode="apbv", world_size=2, anchor_len=5, query_len=4, passing_len=3, zigzag=True, window=3)
    g = torch.Generator().manual_seed(6)
    a, n, hq, hkv, d = 5, 43, 6, 2, 8
    s = a + n
    q, k, v = (torch.randn(s, 2, h, d, generator=g) for h in (hq, hkv, hkv))
    out = _oracle({**settings, "batched": True, "replica_len": a}).forward(q, k, v, None).reshape(s, 2, hq, d)
    opts = {key: val for key, val in settings.items() if key != "mode"}
    for i in range(2):
        inner = apbv_mask_reference(q[a:, i], k[a:, i], softmax_scale=1 / math.sqrt(8), **opts)  # [hkv, n, n]
        mask = torch.zeros(hkv, s, s, dtype=torch.bool)
        mask[:, :a, :a] = torch.ones(a, a, dtype=torch.bool).tril()
        mask[:, a:, a:] = inner
        blocks = slice(2 * a, s - settings["query_len"])  # the prompt's block rows
        mask[:, blocks, :a] = inner[:, a:n - settings["query_len"], :a]  # ... see the replica ...
        mask[:, blocks, a:2 * a] = False  # ... and not the prompt's own anchor
        ref = masked_attention_reference(q[:, i], k[:, i], v[:, i], mask, softmax_scale=1 / math.sqrt(8))
        torch.testing.assert_close(out[:, i], ref, atol=1e-5, rtol=1e-5)
