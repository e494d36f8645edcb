"""Tests of the single-process APB-V reference oracle (megatron_apbv/apbv/reference.py)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_apbv.apbv.reference import (
    apbv_attention_reference,
    apbv_block_bounds_reference,
    apbv_mask_reference,
    apbv_passing_selection_reference,
    dense_attention_reference,
)

torch.set_num_threads(2)


def make_qkv(n, heads, kv_heads, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(n, kv_heads, dim, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(n, kv_heads, dim, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def split_blocks(n, a, ql, w, zigzag):
    """Independent block split via torch.tensor_split."""
    m = 2 * w if zigzag else w
    return [
        (int(b[0]), int(b[-1]) + 1) if len(b) else None
        for b in torch.tensor_split(torch.arange(a, n - ql), m)
    ]


def sdpa_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk, vv, is_causal=True
    )
    return out.transpose(0, 1)


# --------------------------------------------------------------------------
# dense and blocks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 4, 7])
def test_dense_matches_sdpa(group):
    q, k, v = make_qkv(45, 2 * group, 2, seed=group)
    torch.testing.assert_close(dense_attention_reference(q, k, v), sdpa_causal(q, k, v))


def test_dense_softmax_scale_and_dtype():
    q, k, v = make_qkv(20, 4, 2, dtype=torch.float32)
    out = dense_attention_reference(q, k, v, softmax_scale=0.3)
    assert out.dtype == torch.float32 and out.shape == (20, 4, 8)
    ref = dense_attention_reference(q * 0.3 * math.sqrt(8), k, v)
    torch.testing.assert_close(out, ref)
    qb = q.to(torch.bfloat16)
    assert dense_attention_reference(qb, k.to(torch.bfloat16), v.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "n,a,ql,w,zigzag",
    [(50, 5, 3, 2, True), (50, 5, 3, 3, False), (13, 4, 4, 4, True), (10, 2, 2, 3, False), (7, 3, 4, 2, True)],
)
def test_block_bounds_tensor_split_rule(n, a, ql, w, zigzag):
    bounds = apbv_block_bounds_reference(n, world_size=w, anchor_len=a, query_len=ql, zigzag=zigzag)
    expected = split_blocks(n, a, ql, w, zigzag)
    assert len(bounds) == (2 * w if zigzag else w)
    pos = a
    for (s, e), exp in zip(bounds, expected):
        assert s == pos and e >= s
        pos = e
        assert (None if s == e else (s, e)) == exp
    assert pos == n - ql


# --------------------------------------------------------------------------
# exact mode, query exactness, Star
# --------------------------------------------------------------------------

# (N, anchor, query): N not divisible by 128 or W; last one has context < 2W.
SHAPES = [(37, 4, 3), (61, 7, 5), (11, 3, 3)]


@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("group", [1, 4, 7, 8])
def test_exact_mode_equals_dense(w, zigzag, group):
    kv_heads = 2 if group < 7 else 1
    for idx, (n, a, ql) in enumerate(SHAPES):
        q, k, v = make_qkv(n, group * kv_heads, kv_heads, seed=100 * w + group + idx)
        dense = dense_attention_reference(q, k, v)
        bounds = apbv_block_bounds_reference(n, world_size=w, anchor_len=a, query_len=ql, zigzag=zigzag)
        max_len = max(e - s for s, e in bounds)
        for p in (float("inf"), max_len, max_len + 3):
            kw = dict(world_size=w, anchor_len=a, query_len=ql, passing_len=p, zigzag=zigzag)
            mask = apbv_mask_reference(q, k, **kw)
            assert torch.equal(mask, torch.ones(kv_heads, n, n, dtype=torch.bool).tril())
            torch.testing.assert_close(apbv_attention_reference(q, k, v, **kw), dense, rtol=1e-12, atol=1e-12)


def test_exact_mode_with_empty_blocks():
    # context of 3 tokens cut into 8 (zigzag, W=4) or 4 (W=4 off) blocks
    n, a, ql = 10, 4, 3
    q, k, v = make_qkv(n, 4, 2, seed=3)
    for zigzag in (True, False):
        bounds = apbv_block_bounds_reference(n, world_size=4, anchor_len=a, query_len=ql, zigzag=zigzag)
        assert any(s == e for s, e in bounds)
        sel = apbv_passing_selection_reference(
            q, k, world_size=4, anchor_len=a, query_len=ql, passing_len=2, zigzag=zigzag
        )
        assert [tuple(t.shape) for t in sel] == [(2, min(2, e - s)) for s, e in bounds]
        out = apbv_attention_reference(
            q, k, v, world_size=4, anchor_len=a, query_len=ql, passing_len=float("inf"), zigzag=zigzag
        )
        torch.testing.assert_close(out, dense_attention_reference(q, k, v))


def test_empty_context_and_no_anchor():
    q, k, v = make_qkv(9, 2, 1, seed=5)
    dense = dense_attention_reference(q, k, v)
    # context empty: anchor + query cover everything
    out = apbv_attention_reference(q, k, v, world_size=2, anchor_len=5, query_len=4, passing_len=0)
    torch.testing.assert_close(out, dense)
    # no anchor, Star mode: first block rows are plain causal
    out = apbv_attention_reference(q, k, v, world_size=1, anchor_len=0, query_len=2, passing_len=0)
    s, e = apbv_block_bounds_reference(9, world_size=1, anchor_len=0, query_len=2)[0]
    torch.testing.assert_close(out[s:e], dense[s:e])


@pytest.mark.parametrize("seed", range(6))
def test_query_rows_always_dense(seed):
    g = torch.Generator().manual_seed(seed)
    w = int(torch.randint(1, 5, (1,), generator=g))
    zigzag = bool(seed % 2)
    group = [1, 4, 7][seed % 3]
    n = int(torch.randint(20, 70, (1,), generator=g))
    a = int(torch.randint(0, 6, (1,), generator=g))
    ql = int(torch.randint(1, 6, (1,), generator=g))
    p = int(torch.randint(0, 6, (1,), generator=g))
    q, k, v = make_qkv(n, group * 2, 2, seed=seed)
    out = apbv_attention_reference(q, k, v, world_size=w, anchor_len=a, query_len=ql, passing_len=p, zigzag=zigzag)
    dense = dense_attention_reference(q, k, v)
    torch.testing.assert_close(out[n - ql :], dense[n - ql :], rtol=1e-12, atol=1e-12)
    # anchor rows are causal inside A, hence also dense
    torch.testing.assert_close(out[:a], dense[:a], rtol=1e-12, atol=1e-12)
    if 0 < p:
        # with a real budget below the block length, some block row must differ
        bounds = apbv_block_bounds_reference(n, world_size=w, anchor_len=a, query_len=ql, zigzag=zigzag)
        if len(bounds) > 1 and p < min(e - s for s, e in bounds):
            assert not torch.allclose(out[a : n - ql], dense[a : n - ql])


def star_attention(q, k, v, a, ql, w, zigzag):
    """Independent Star Attention: block rows see A + own block causally."""
    n = q.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask[:a] = causal[:a]
    mask[n - ql :] = causal[n - ql :]
    for block in torch.tensor_split(torch.arange(a, n - ql), 2 * w if zigzag else w):
        for i in block.tolist():
            mask[i, :a] = True
            mask[i, int(block[0]) : i + 1] = True
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1).double()
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1).double()
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1).double(), kk, vv, attn_mask=mask)
    return out.transpose(0, 1).to(q.dtype)


@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("zigzag", [True, False])
def test_passing_zero_is_star_attention(w, zigzag):
    for n, a, ql in [(43, 5, 4), (12, 3, 2)]:
        q, k, v = make_qkv(n, 8, 2, seed=w + n)
        out = apbv_attention_reference(q, k, v, world_size=w, anchor_len=a, query_len=ql, passing_len=0, zigzag=zigzag)
        torch.testing.assert_close(out, star_attention(q, k, v, a, ql, w, zigzag))
        sel = apbv_passing_selection_reference(q, k, world_size=w, anchor_len=a, query_len=ql, passing_len=0, zigzag=zigzag)
        assert all(s.shape == (2, 0) for s in sel)


def test_zigzag_changes_block_count():
    n, a, ql = 40, 4, 4
    q, k, v = make_qkv(n, 2, 1, seed=9)
    on = apbv_attention_reference(q, k, v, world_size=2, anchor_len=a, query_len=ql, passing_len=0, zigzag=True)
    off = apbv_attention_reference(q, k, v, world_size=2, anchor_len=a, query_len=ql, passing_len=0, zigzag=False)
    assert len(apbv_passing_selection_reference(q, k, world_size=2, anchor_len=a, query_len=ql, passing_len=1)) == 4
    assert not torch.allclose(on, off)
    # zigzag on with W equals zigzag off with 2W
    off2 = apbv_attention_reference(q, k, v, world_size=4, anchor_len=a, query_len=ql, passing_len=3, zigzag=False)
    on2 = apbv_attention_reference(q, k, v, world_size=2, anchor_len=a, query_len=ql, passing_len=3, zigzag=True)
    torch.testing.assert_close(on2, off2, rtol=0, atol=0)


def test_gqa_selection_uses_group_mean_and_heads_differ():
    n, a, ql, group = 40, 2, 3, 4
    q, k, v = make_qkv(n, 2 * group, 2, seed=11)
    kw = dict(world_size=2, anchor_len=a, query_len=ql, passing_len=3, window=1)
    sel = apbv_passing_selection_reference(q, k, **kw)
    # recompute block 0 selection by brute force
    qbar = q[n - ql :].reshape(ql, 2, group, -1).mean(2)
    (s, e) = apbv_block_bounds_reference(n, world_size=2, anchor_len=a, query_len=ql)[0]
    for h in range(2):
        score = torch.stack([sum(k[t, h] @ qbar[i, h] for i in range(ql)) / ql for t in range(s, e)])
        expected = sorted((torch.argsort(score, descending=True)[:3] + s).tolist())
        assert sel[0][h].tolist() == expected
    assert any(not torch.equal(x[0], x[1]) for x in sel)
    # the mask of the two KV heads differ accordingly
    mask = apbv_mask_reference(q, k, **kw)
    assert not torch.equal(mask[0], mask[1])


# --------------------------------------------------------------------------
# hand-checked tiny cases
# --------------------------------------------------------------------------


def tiny_qk(raw_scores, n, heads=1):
    """q/k with dim 1 so that the selection score of key t equals raw_scores[t]."""
    q = torch.zeros(n, heads, 1, dtype=torch.float64)
    q[:, :, 0] = 1.0
    k = torch.tensor(raw_scores, dtype=torch.float64).reshape(n, 1, 1)
    return q, k


def test_hand_checked_tiny_mask():
    # N=12, a=2, q=2, W=2, zigzag: blocks B0=[2,4) B1=[4,6) B2=[6,8) B3=[8,10)
    n = 12
    raw = [0, 0, 1, 5, 9, 2, 0, 7, 3, 1, 0, 0]
    q, k = tiny_qk(raw, n)
    kw = dict(world_size=2, anchor_len=2, query_len=2, passing_len=1, zigzag=True, window=1)
    sel = apbv_passing_selection_reference(q, k, **kw)
    assert [s.tolist() for s in sel] == [[[3]], [[4]], [[7]], [[8]]]
    rows = {
        0: [0],
        1: [0, 1],
        2: [0, 1, 2],
        3: [0, 1, 2, 3],
        4: [0, 1, 3, 4],
        5: [0, 1, 3, 4, 5],
        6: [0, 1, 3, 4, 6],
        7: [0, 1, 3, 4, 6, 7],
        8: [0, 1, 3, 4, 7, 8],
        9: [0, 1, 3, 4, 7, 8, 9],
        10: list(range(11)),
        11: list(range(12)),
    }
    expected = torch.zeros(1, n, n, dtype=torch.bool)
    for i, cols in rows.items():
        expected[0, i, cols] = True
    assert torch.equal(apbv_mask_reference(q, k, **kw), expected)

    # window 5 over blocks of length 2: both keys of a block tie -> lower index wins
    sel5 = apbv_passing_selection_reference(q, k, **{**kw, "window": 5})
    assert [s.tolist() for s in sel5] == [[[2]], [[4]], [[6]], [[8]]]

    # zigzag off: W=2 blocks [2,6) [6,10)
    sel_off = apbv_passing_selection_reference(q, k, **{**kw, "zigzag": False, "passing_len": 2})
    assert [s.tolist() for s in sel_off] == [[[3, 4]], [[7, 8]]]


def test_smoothing_stays_inside_block():
    # W=1 zigzag: a=1, blocks B0=[1,7) B1=[7,13), query [13,14)
    raw = [0, 0, 5, 0, 0, 0, 4, 100, 0, 0, 0, 0, 0, 0]
    q, k = tiny_qk(raw, 14)
    kw = dict(world_size=1, anchor_len=1, query_len=1, passing_len=4, window=3)
    sel = apbv_passing_selection_reference(q, k, **kw)
    # smoothed B0: [5,5,5,0,4,4] at positions 1..6 (100 at 7 must not leak into 6);
    # top-4 with lower-index tie-break: 1,2,3 (5) then 5 (4)
    assert sel[0].tolist() == [[1, 2, 3, 5]]
    # smoothed B1: [100,100,0,0,0,0] -> 7,8 then 9,10 (ties at 0)
    assert sel[1].tolist() == [[7, 8, 9, 10]]
    # without smoothing: 2, 6, then ties at 0 -> 1, 3
    sel1 = apbv_passing_selection_reference(q, k, **{**kw, "window": 1})
    assert sel1[0].tolist() == [[1, 2, 3, 6]]
    mask = apbv_mask_reference(q, k, **kw)[0]
    assert mask[10].nonzero().flatten().tolist() == [0, 1, 2, 3, 5, 7, 8, 9, 10]


def test_selection_sign_matters():
    # a negative query direction inverts the preference
    raw = [0, 3, -2, 1, 0]
    q, k = tiny_qk(raw, 5)
    kw = dict(world_size=1, anchor_len=0, query_len=1, passing_len=1, zigzag=False, window=1)
    assert apbv_passing_selection_reference(q, k, **kw)[0].tolist() == [[1]]
    assert apbv_passing_selection_reference(-q, k, **kw)[0].tolist() == [[2]]


# --------------------------------------------------------------------------
# property test
# --------------------------------------------------------------------------


@st.composite
def configs(draw):
    n = draw(st.integers(1, 40))
    a = draw(st.integers(0, n))
    ql = draw(st.integers(0, n - a))
    w = draw(st.integers(1, 4))
    zigzag = draw(st.booleans())
    p = draw(st.one_of(st.integers(0, 8), st.just(float("inf"))))
    window = draw(st.sampled_from([1, 3, 5, 7]))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return n, a, ql, w, zigzag, p, window, kv_heads, group, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_mask_properties(cfg):
    n, a, ql, w, zigzag, p, window, kv_heads, group, seed = cfg
    q, k, v = make_qkv(n, kv_heads * group, kv_heads, dim=4, seed=seed)
    kw = dict(world_size=w, anchor_len=a, query_len=ql, passing_len=p, zigzag=zigzag, window=window)
    mask = apbv_mask_reference(q, k, **kw)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert mask.shape == (kv_heads, n, n)
    # diagonal always visible (rows never empty)
    assert bool(mask.diagonal(dim1=1, dim2=2).all())
    # mask subset of causal
    assert not bool((mask & ~causal).any())
    # anchor rows see exactly causal A, nothing beyond
    assert torch.equal(mask[:, :a], causal[:a].expand(kv_heads, a, n))
    # query rows are dense causal
    assert torch.equal(mask[:, n - ql :], causal[n - ql :].expand(kv_heads, ql, n))
    bounds = apbv_block_bounds_reference(n, world_size=w, anchor_len=a, query_len=ql, zigzag=zigzag)
    sel = apbv_passing_selection_reference(q, k, **kw)
    for j, (s, e) in enumerate(bounds):
        pj = min(p, e - s)
        assert sel[j].shape == (kv_heads, pj)
        assert bool(((sel[j] >= s) & (sel[j] < e)).all())
        assert torch.equal(sel[j], sel[j].sort(dim=1).values)
        assert all(len(set(row)) == pj for row in sel[j].tolist())
        for i in range(s, e):
            # block row: all of A, own block causally, nothing of later blocks or Q
            assert bool(mask[:, i, :a].all())
            assert bool(mask[:, i, s : i + 1].all())
            # earlier context keys visible exactly when selected
            for jj in range(j):
                s2, e2 = bounds[jj]
                for h in range(kv_heads):
                    vis = mask[h, i, s2:e2].nonzero().flatten() + s2
                    assert vis.tolist() == sel[jj][h].tolist()
    if p == float("inf"):
        assert torch.equal(mask, causal.expand(kv_heads, n, n))
    out = apbv_attention_reference(q, k, v, **kw)
    assert out.shape == (n, kv_heads * group, 4) and bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(anchor_len=6, query_len=5), "anchor_len \\+ query_len"),
        (dict(world_size=0), "world_size"),
        (dict(world_size=1.0), "world_size"),
        (dict(anchor_len=-1), "anchor_len"),
        (dict(query_len=-2), "query_len"),
        (dict(passing_len=-1), "passing_len"),
        (dict(passing_len=1.5), "passing_len"),
        (dict(passing_len=float("-inf")), "passing_len"),
        (dict(passing_len=float("nan")), "passing_len"),
        (dict(window=0), "window"),
        (dict(window=4), "window"),
        (dict(window=-3), "window"),
        (dict(window=3.0), "window"),
    ],
)
def test_argument_validation(override, match):
    q, k, v = make_qkv(10, 4, 2)
    kw = dict(world_size=2, anchor_len=2, query_len=2, passing_len=1, zigzag=True, window=5)
    kw.update(override)
    with pytest.raises(ValueError, match=match):
        apbv_attention_reference(q, k, v, **kw)
    with pytest.raises(ValueError, match=match):
        apbv_passing_selection_reference(q, k, **kw)
    with pytest.raises(ValueError, match=match):
        apbv_mask_reference(q, k, **kw)


def test_heads_not_divisible_by_kv_heads():
    q, k, v = make_qkv(10, 6, 4)
    with pytest.raises(ValueError, match="kv_heads"):
        apbv_attention_reference(q, k, v, world_size=1, anchor_len=1, query_len=1, passing_len=1)
    with pytest.raises(ValueError, match="kv_heads"):
        dense_attention_reference(q, k, v)


def test_shape_mismatch():
    q, k, v = make_qkv(10, 4, 2)
    with pytest.raises(ValueError, match="k has"):
        dense_attention_reference(q, k[:9], v[:9])
    with pytest.raises(ValueError, match="v shape"):
        dense_attention_reference(q, k, v[:, :1])
