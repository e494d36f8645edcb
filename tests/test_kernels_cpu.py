"""CPU tests of the Triton kernels in ``kernels/`` through the Triton interpreter.

The kernels are loaded as a private copy of the package with
``TRITON_INTERPRET=1`` set only while that copy is imported (``triton.jit``
decides interpreter vs. compiler at decoration time), then the variable is
restored, so nothing leaks into other test modules. bf16 ``tl.dot`` is wrong in
the interpreter, so fp16 and fp32 are tested here (bf16 in test_kernels_gpu.py).

References are independent: float64, an explicit boolean mask over the
concatenated keys, softmax, matmul.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import subprocess
import sys

import pytest
from interpreted_kernels import load_interpreted_kernels
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Under TRITON_INTERPRET=1 the tests below run directly. Otherwise this module
# re-runs itself in a subprocess with the variable set: triton.jit picks
# interpreter vs. compiler when a module is imported and Triton's own library
# is decorated the same way, so the variable must be set before Triton is
# imported and must not leak into other test modules of this process.
_IN_INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_interpreted_kernels():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton cannot be imported: {exc}", allow_module_level=True)
    return load_interpreted_kernels("_apbv_kernels_interpreted")


if _IN_INTERP:
    K = _load_interpreted_kernels()
    attn_mod = sys.modules[K.__name__ + ".apb_attention"]
else:
    K = attn_mod = None


def test_cpu_kernels_under_interpreter():
    """Outer entry: run this module's tests in a subprocess with TRITON_INTERPRET=1."""
    if _IN_INTERP:
        pytest.skip("already inside the interpreter run")
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton cannot be imported: {exc}")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pathlib.Path(__file__))],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout[-8000:] + "\n" + proc.stderr[-3000:])
    assert proc.returncode == 0, tail
    print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")


# ----------------------------------------------------------------------------
# references (float64, explicit mask)
# ----------------------------------------------------------------------------

def apb_mask(sq, anchor_rows, n_pass, a, lk):
    """Boolean [sq, n_pass + a + lk] visibility over keys [P | A | B]."""
    lq = sq - anchor_rows
    mask = torch.zeros(sq, n_pass + a + lk, dtype=torch.bool)
    for r in range(sq):
        if r < anchor_rows:
            for j in range(a):
                mask[r, n_pass + j] = j <= r
        else:
            i = r - anchor_rows
            mask[r, : n_pass + a] = True
            for j in range(lk):
                mask[r, n_pass + a + j] = j <= i + (lk - lq)
    return mask


def ref_attention(q, kp, vp, ka, va, kb, vb, anchor_rows, scale):
    sq, b, hq, d = q.shape
    hkv = kb.shape[2]
    g = hq // hkv
    keys = torch.cat([kp, ka, kb]).double()
    vals = torch.cat([vp, va, vb]).double()
    mask = apb_mask(sq, anchor_rows, kp.shape[0], ka.shape[0], kb.shape[0])
    out = torch.zeros(sq, b, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, sq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // g
            s = q[:, bi, h].double() @ keys[:, bi, kh].T * scale  # [sq, T]
            s = s.masked_fill(~mask, -math.inf)
            for r in range(sq):
                if mask[r].any():
                    row_lse = torch.logsumexp(s[r], 0)
                    lse[bi, h, r] = row_lse
                    out[r, bi, h] = torch.softmax(s[r], 0) @ vals[:, bi, kh]
    return out, lse


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _check_attn(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)                       # [b, h, sq]
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty)
    empty_rows = empty.permute(2, 0, 1)                # [sq, b, h]
    assert (out[empty_rows] == 0).all()
    tol_out, tol_lse = (1e-5, 1e-5) if dtype == torch.float32 else (3e-3, 2e-3)
    if ref_out.norm() > 0:
        rel = (out.double() - ref_out).norm() / ref_out.norm()
        assert rel < tol_out, f"relative error {rel:.3e}"
    fin = ~empty
    if fin.any():
        err = (lse.double()[fin] - ref_lse[fin]).abs().max()
        assert err < tol_lse * max(1.0, ref_lse[fin].abs().max().item()), f"lse error {err:.3e}"


# (anchor_rows, n_pass, a, Lq, Lk, hq, hkv, d, dtype)
ATTN_CASES = [
    (0, 0, 0, 33, 33, 7, 1, 64, torch.float16),      # plain causal, GQA 7
    (7, 5, 7, 33, 33, 4, 1, 64, torch.float32),      # full APB-V layout, GQA 4
    (0, 0, 7, 1, 100, 2, 2, 128, torch.float16),     # one query row, bottom-right causal
    (0, 0, 0, 7, 3, 2, 1, 64, torch.float32),        # Lk < Lq: first rows see nothing
    (0, 0, 0, 5, 0, 2, 1, 64, torch.float32),        # nothing visible at all
    (16, 0, 16, 0, 0, 7, 1, 64, torch.float32),      # anchor rows only
    (0, 17, 0, 7, 0, 8, 2, 64, torch.float16),       # passing keys only, GQA 4
    (5, 33, 5, 1, 1, 2, 1, 128, torch.float16),      # d 128, one block row
    (0, 7, 3, 33, 40, 7, 1, 64, torch.float32),      # Lk > Lq, no anchor rows
    (20, 9, 20, 30, 30, 2, 2, 64, torch.float32),    # anchor/block boundary inside a tile
    (1, 0, 1, 0, 0, 1, 1, 64, torch.float32),        # one anchor row
    (0, 0, 0, 100, 100, 1, 1, 64, torch.float16),    # many tiles, GQA 1
    (3, 9, 3, 20, 40, 4, 2, 80, torch.float32),      # d 80 padded to 128: the head-dim-masked tile loads
]


def _attn_inputs(b, sq, hq, hkv, d, lengths, dtype, gen):
    """``q`` ``[sq, b, hq, d]`` and K, V of the passing, anchor and block segments (``lengths`` keys each)."""
    q = _rand((sq, b, hq, d), dtype, gen)  # drawn first, then K and V of each segment in turn
    return (q, *(_rand((n, b, hkv, d), dtype, gen) for n in lengths for _ in "kv"))


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "ar{}_p{}_a{}_lq{}_lk{}_h{}x{}_d{}_{}".format(
    *c[:8], str(c[8]).split(".")[-1]))
def test_apb_attention_matches_reference(case):
    ar, n_pass, a, lq, lk, hq, hkv, d, dtype = case
    gen = torch.Generator().manual_seed(hash(case) % (2 ** 31))
    b, sq = 2, ar + lq
    q, kp, vp, ka, va, kb, vb = _attn_inputs(b, sq, hq, hkv, d, (n_pass, a, lk), dtype, gen)
    scale = d ** -0.5
    out, lse = K.apb_attention(q, kp, vp, ka, va, kb, vb, anchor_rows=ar, softmax_scale=scale)
    assert out.shape == (sq, b, hq, d) and lse.shape == (b, hq, sq)
    ref_out, ref_lse = ref_attention(q, kp, vp, ka, va, kb, vb, ar, scale)
    _check_attn(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("config", [(32, 16, 4, 1), (16, 32, 4, 1), (64, 64, 4, 1)])
def test_apb_attention_tile_configs(config):
    """Tile skipping / masking logic must not depend on BLOCK_M vs BLOCK_N."""
    gen = torch.Generator().manual_seed(1234 + config[0] + config[1])
    ar, n_pass, a, lq, lk, hq, hkv, d = 19, 21, 19, 37, 45, 4, 2, 64
    dtype = torch.float32
    b, sq = 1, ar + lq
    q, kp, vp, ka, va, kb, vb = _attn_inputs(b, sq, hq, hkv, d, (n_pass, a, lk), dtype, gen)
    out = torch.full((sq, b, hq, d), float("nan"), dtype=dtype)
    lse = torch.full((b, hq, sq), float("nan"), dtype=torch.float32)
    attn_mod.apb_attention_impl(q, kp, vp, ka, va, kb, vb, anchor_rows=ar, softmax_scale=0.1,
                                config=config, out=out, lse=lse)
    ref_out, ref_lse = ref_attention(q, kp, vp, ka, va, kb, vb, ar, 0.1)
    _check_attn(out, lse, ref_out, ref_lse, dtype)


def test_apb_attention_strided_views_and_large_scores():
    """Non-contiguous inputs along seq (and packed K/V), large logits."""
    gen = torch.Generator().manual_seed(7)
    dtype = torch.float16
    ar, n_pass, a, lq, lk, hq, hkv, d = 4, 6, 4, 21, 21, 4, 1, 64
    b = 2
    sq = ar + lq
    q_big = _rand((2 * sq, b, hq, d), dtype, gen)
    q = q_big[::2]                                        # seq stride doubled
    kv_b = _rand((lk, b, hkv, 2, d), dtype, gen)          # packed K/V: strides (.., 2d, d, 1)
    kb, vb = kv_b[:, :, :, 0], kv_b[:, :, :, 1]
    kv_p = _rand((n_pass + 3, b, hkv, 2, d), dtype, gen)[3:]
    kp, vp = kv_p[:, :, :, 0], kv_p[:, :, :, 1]
    ka = _rand((3 * a, b, hkv, d), dtype, gen)[::3]
    va = _rand((a, b, hkv, d), dtype, gen)
    assert not q.is_contiguous() and not kb.is_contiguous()
    scale = 4.0 / math.sqrt(d)                            # logits up to ~ +-30
    out, lse = K.apb_attention(q, kp, vp, ka, va, kb, vb, anchor_rows=ar, softmax_scale=scale)
    ref_out, ref_lse = ref_attention(q, kp, vp, ka, va, kb, vb, ar, scale)
    _check_attn(out, lse, ref_out, ref_lse, dtype)


def test_apb_attention_rejects_bad_anchor_rows():
    q = torch.randn(5, 1, 2, 64)
    kv = torch.randn(3, 1, 1, 64)
    empty = torch.randn(0, 1, 1, 64)
    with pytest.raises(ValueError):
        K.apb_attention(q, empty, empty, kv, kv, kv, kv, anchor_rows=2, softmax_scale=1.0)


# ----------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------

def ref_merge(outs, lses):
    outs = outs.double()
    lses = lses.double()
    lse = torch.logsumexp(lses, dim=0)                     # [b, h, sq], -inf if all -inf
    w = torch.exp(lses - lse.unsqueeze(0)).nan_to_num(0.0)  # [W, b, h, sq]
    w = torch.where(torch.isinf(lses), torch.zeros_like(w), w)
    outs = torch.where(torch.isinf(lses).permute(0, 3, 1, 2).unsqueeze(-1), 0.0, outs)
    out = (w.permute(0, 3, 1, 2).unsqueeze(-1) * outs).sum(0)
    return out, lse


@pytest.mark.parametrize("W,sq,b,h,d,dtype", [
    (3, 7, 2, 3, 64, torch.float32),
    (1, 33, 1, 2, 128, torch.float16),
    (5, 100, 1, 1, 64, torch.float32),
])
def test_merge_partials(W, sq, b, h, d, dtype):
    gen = torch.Generator().manual_seed(W * 1000 + sq)
    outs = _rand((W, sq, b, h, d), dtype, gen)
    lses = (_rand((W, b, h, sq), torch.float32, gen) * 20.0)
    # some partials see nothing: lse -inf, and their outs are garbage (NaN)
    dead = torch.rand((W, b, h, sq), generator=gen) < 0.3
    lses[dead] = -math.inf
    outs = outs.clone()
    outs[dead.permute(0, 3, 1, 2)] = float("nan")
    # a row where all partials are -inf
    lses[:, 0, 0, sq // 2] = -math.inf
    out, lse = K.merge_partials(outs, lses)
    ref_out, ref_lse = ref_merge(outs, lses)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (out[sq // 2, 0, 0] == 0).all()
    fin = ~torch.isinf(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5 * max(1.0, ref_lse[fin].abs().max().item())
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    rel = (out.double() - ref_out).norm() / ref_out.norm()
    assert rel < tol, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_pair_into_strided_slices(dtype):
    """Two separate partials (one a strided view) merged straight into row slices of a larger result."""
    gen = torch.Generator().manual_seed(11)
    sq, b, h, d = 37, 1, 3, 80
    a = _rand((sq, b, h, d), dtype, gen)
    bt = _rand((b, h, sq, d), dtype, gen).permute(2, 0, 1, 3)  # [s, b, h, d] view of a [b, h, s, d] tensor
    la, lb = _rand((b, h, sq), torch.float32, gen) * 10, _rand((b, h, sq), torch.float32, gen) * 10
    la[0, 1, :5] = -math.inf
    a[:5, 0, 1] = float("nan")  # never read: lse -inf
    la[0, 2, 7] = lb[0, 2, 7] = -math.inf
    out = torch.full((sq + 4, b, h, d), float("nan"), dtype=dtype)
    lse = torch.full((b, h, sq + 4), float("nan"))
    K.merge_pair(a, la, bt, lb, out=out[4:], lse=lse[:, :, 4:])
    ref_out, ref_lse = ref_merge(torch.stack([a, bt]), torch.stack([la, lb]))
    assert torch.isnan(out[:4]).all() and torch.isnan(lse[:, :, :4]).all()  # outside the slices: untouched
    got, got_lse = out[4:], lse[:, :, 4:]
    assert not torch.isnan(got).any() and torch.equal(torch.isinf(got_lse), torch.isinf(ref_lse))
    assert (got[7, 0, 2] == 0).all()
    fin = ~torch.isinf(ref_lse)
    assert (got_lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5 * ref_lse[fin].abs().max().item()
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert (got.double() - ref_out).norm() / ref_out.norm() < tol


def test_merge_of_split_keys_equals_full_attention():
    """apb_attention over key subsets + merge == apb_attention over all keys."""
    gen = torch.Generator().manual_seed(99)
    dtype = torch.float32
    lq, n_pass, a, lk, hq, hkv, d, b = 17, 9, 5, 17, 4, 2, 64, 1
    q = _rand((lq, b, hq, d), dtype, gen)
    kp, vp = _rand((n_pass, b, hkv, d), dtype, gen), _rand((n_pass, b, hkv, d), dtype, gen)
    ka, va = _rand((a, b, hkv, d), dtype, gen), _rand((a, b, hkv, d), dtype, gen)
    kb, vb = _rand((lk, b, hkv, d), dtype, gen), _rand((lk, b, hkv, d), dtype, gen)
    e = kp[:0]
    full = K.apb_attention(q, kp, vp, ka, va, kb, vb, anchor_rows=0, softmax_scale=0.125)
    p1 = K.apb_attention(q, kp, vp, e, e, e, e, anchor_rows=0, softmax_scale=0.125)
    p2 = K.apb_attention(q, e, e, ka, va, e, e, anchor_rows=0, softmax_scale=0.125)
    p3 = K.apb_attention(q, e, e, e, e, kb, vb, anchor_rows=0, softmax_scale=0.125)
    out, lse = K.merge_partials(torch.stack([p1[0], p2[0], p3[0]]), torch.stack([p1[1], p2[1], p3[1]]))
    assert (out - full[0]).abs().max() < 1e-5
    assert (lse - full[1]).abs().max() < 1e-5


# ----------------------------------------------------------------------------
# scoring and selection
# ----------------------------------------------------------------------------

def ref_scores(q_query, k_block, window):
    nq, b, hq, d = q_query.shape
    L, _, hkv, _ = k_block.shape
    g = hq // hkv
    qbar = q_query.double().reshape(nq, b, hkv, g, d).mean(dim=(0, 3))     # [b, hkv, d]
    raw = torch.einsum("tbhd,bhd->bht", k_block.double(), qbar)           # [b, hkv, L]
    half = window // 2
    pooled = torch.empty_like(raw)
    for t in range(L):
        lo, hi = max(0, t - half), min(L, t + half + 1)
        pooled[..., t] = raw[..., lo:hi].max(dim=-1).values
    return pooled


@pytest.mark.parametrize("nq,L,hq,hkv,d,window,dtype", [
    (3, 1, 4, 1, 64, 5, torch.float32),
    (5, 7, 4, 2, 64, 5, torch.float16),
    (1, 100, 7, 1, 128, 5, torch.float32),
    (4, 130, 2, 2, 64, 3, torch.float32),     # several programs, halo across them
    (2, 33, 8, 2, 64, 1, torch.float16),      # window 1 = no pooling
    (2, 70, 4, 1, 64, 9, torch.float32),
])
def test_passing_scores(nq, L, hq, hkv, d, window, dtype):
    gen = torch.Generator().manual_seed(nq * 7919 + L)
    b = 2
    q_query = _rand((nq, b, hq, d), dtype, gen)
    k_block = _rand((L, b, hkv, d), dtype, gen)
    got = K.passing_scores(q_query, k_block, window=window)
    ref = ref_scores(q_query, k_block, window)
    assert got.shape == (b, hkv, L) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert (got.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


def test_passing_scores_strided_keys():
    gen = torch.Generator().manual_seed(5)
    kv = _rand((40, 1, 2, 2, 64), torch.float32, gen)
    k_block = kv[:, :, :, 0]
    q_query = _rand((6, 1, 8, 64), torch.float32, gen)[::2]
    got = K.passing_scores(q_query, k_block, window=5)
    ref = ref_scores(q_query, k_block, 5)
    assert (got.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


def _selected_indices(k_sel, k_block):
    """Recover, per (b, h), the sorted block positions of the selected rows."""
    n, b, hkv, d = k_sel.shape
    res = {}
    for bi in range(b):
        for h in range(hkv):
            eq = (k_sel[:, None, bi, h] == k_block[None, :, bi, h]).all(-1)  # [n, L]
            assert (eq.sum(1) == 1).all()
            res[(bi, h)] = sorted(eq.float().argmax(1).tolist())
    return res


@pytest.mark.parametrize("L,p,ties", [(7, 3, False), (33, 33, False), (33, 100, False), (100, 17, False),
                                      (5, 0, False), (100, 17, True), (64, 9, True)])
def test_select_passing(L, p, ties):
    gen = torch.Generator().manual_seed(L * 31 + p)
    b, hkv, d = 2, 3, 64
    k_block = _rand((L, b, hkv, d), torch.float16, gen)
    v_block = _rand((L, b, hkv, d), torch.float16, gen)
    scores = torch.randn((b, hkv, L), generator=gen)
    if ties:  # pooled-like scores: many equal values, negatives, -0.0 and +0.0
        scores = torch.nn.functional.max_pool1d(scores.round(decimals=1), 5, stride=1, padding=2)
        scores[..., ::7] = -0.0
        scores[..., 3::7] = 0.0
    k_sel, v_sel = K.select_passing(k_block, v_block, scores, p)
    n = min(p, L)
    assert k_sel.shape == (n, b, hkv, d) and v_sel.shape == (n, b, hkv, d)
    if n == 0:
        return
    got = _selected_indices(k_sel, k_block)
    for (bi, h), idx in got.items():
        ref = sorted(torch.sort(scores[bi, h], descending=True, stable=True).indices[:n].tolist())
        assert idx == ref
        # V rows travel with their K rows
        order = [(k_sel[j, bi, h] == k_block[:, bi, h]).all(-1).float().argmax().item() for j in range(n)]
        assert torch.equal(v_sel[:, bi, h], v_block[order, bi, h])


if not _IN_INTERP:  # outer process: only the subprocess entry is collected
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_cpu_kernels_under_interpreter"]:
        del globals()[_name]


@pytest.mark.skipif(not _IN_INTERP, reason="runs inside the interpreter subprocess")
@pytest.mark.parametrize("rows, keys, block, b", [(1, 100, 1, 1), (3, 70, 3, 2), (5, 64, 0, 1)])
def test_split_keys_path_with_the_kernel(rows, keys, block, b):
    """megatron_apbv.apbv.attend's split-keys path (chunks on the batch dimension) driving the real kernel."""
    from megatron_apbv.apbv.attend import attend_split_keys

    g = torch.Generator().manual_seed(rows * keys)
    q = torch.randn(rows, b, 8, 64, generator=g)
    kv = torch.randn(2, keys, b, 2, 64, generator=g)
    kb = torch.randn(2, block, b, 2, 64, generator=g)
    none = kv[0, :0]
    whole = K.apb_attention(q, kv[0], kv[1], none, none, kb[0], kb[1], anchor_rows=0, softmax_scale=0.125)
    split = attend_split_keys(K.apb_attention, q, kv[0], kv[1], kb[0], kb[1], softmax_scale=0.125, chunk=16)
    assert torch.allclose(split[0], whole[0], atol=1e-4)
    assert torch.allclose(split[1], whole[1], atol=1e-4)
