"""The attend step: APB-V mask semantics and the split-keys path for few query rows."""

import torch

from megatron_apbv.apbv.attend import _torch_apb_attention, apb_mask, attend_split_keys


def test_mask_rows():
    m = apb_mask(anchor_rows=2, block_rows=2, n_pass=1, n_anchor=2, n_block=3)
    assert m.int().tolist() == [
        [0, 1, 0, 0, 0, 0],  # anchor row 0: anchor key 0
        [0, 1, 1, 0, 0, 0],  # anchor row 1: anchor keys 0-1
        [1, 1, 1, 1, 1, 0],  # block row 0: passing, anchor, block keys 0-1 (bottom-right aligned)
        [1, 1, 1, 1, 1, 1],
    ]


def test_torch_path_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 1, 8, 16, generator=g)
    k, v = torch.randn(2, 14, 1, 2, 16, generator=g)
    out, lse = _torch_apb_attention(q, k[:3], v[:3], k[3:7], v[3:7], k[7:], v[7:], anchor_rows=4, softmax_scale=0.25)
    mask = apb_mask(4, 5, 3, 4, 7)
    # float64, GQA by repeating the KV heads (query head h reads KV head h // 4)
    qd, kd, vd = q[:, 0].double(), k[:, 0].double().repeat_interleave(4, 1), v[:, 0].double().repeat_interleave(4, 1)
    scores = torch.einsum("shd,thd->hst", qd, kd) * 0.25
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = torch.einsum("hst,thd->shd", scores.softmax(-1), vd)
    assert torch.allclose(out[:, 0].double(), ref, atol=1e-5)
    assert torch.allclose(lse[0].double(), torch.logsumexp(scores, -1), atol=1e-5)


def test_split_keys_equals_one_call():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 2, 8, 16, generator=g)
    kv = torch.randn(2, 1000, 2, 2, 16, generator=g)
    kb = torch.randn(2, 5, 2, 2, 16, generator=g)
    none = kv[0, :0]
    whole = _torch_apb_attention(q, kv[0], kv[1], none, none, kb[0], kb[1], anchor_rows=0, softmax_scale=0.25)
    split = attend_split_keys(_torch_apb_attention, q, kv[0], kv[1], kb[0], kb[1], softmax_scale=0.25, chunk=128)
    assert torch.allclose(split[0], whole[0], atol=1e-5)
    assert torch.allclose(split[1], whole[1], atol=1e-5)
