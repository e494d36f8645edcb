"""GPU tests of the Triton kernels in ``kernels/`` (skipped without CUDA).

bf16/fp16 kernels against float64 references with explicit masks, at
realistic head counts (28 query / 4 KV heads) and odd lengths; outputs are
poisoned with NaN first so that every element must be written.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_kernels():
    name = "_apbv_kernels_gpu"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


if torch.cuda.is_available():
    K = _load_kernels()
    attn_mod = sys.modules[K.__name__ + ".apb_attention"]
else:  # pragma: no cover
    K = attn_mod = None

DEV = "cuda"


def apb_mask(sq, anchor_rows, n_pass, a, lk, device):
    """Boolean [sq, n_pass + a + lk] visibility over keys [P | A | B]."""
    lq = sq - anchor_rows
    r = torch.arange(sq, device=device)[:, None]
    j = torch.arange(n_pass + a + lk, device=device)[None, :]
    is_anchor_row = r < anchor_rows
    in_pass = j < n_pass
    in_anchor = (j >= n_pass) & (j < n_pass + a)
    in_block = j >= n_pass + a
    ja = j - n_pass
    jb = j - n_pass - a
    i = r - anchor_rows
    anchor_vis = in_anchor & (~is_anchor_row | (ja <= r))
    pass_vis = in_pass & ~is_anchor_row
    block_vis = in_block & ~is_anchor_row & (jb <= i + (lk - lq))
    return anchor_vis | pass_vis | block_vis


def ref_attention(q, kp, vp, ka, va, kb, vb, anchor_rows, scale):
    sq, b, hq, d = q.shape
    hkv = kb.shape[2]
    g = hq // hkv
    keys = torch.cat([kp, ka, kb]).double().repeat_interleave(g, dim=2)   # reference only
    vals = torch.cat([vp, va, vb]).double().repeat_interleave(g, dim=2)
    mask = apb_mask(sq, anchor_rows, kp.shape[0], ka.shape[0], kb.shape[0], q.device)
    s = torch.einsum("sbhd,tbhd->bhst", q.double(), keys) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)                                        # -inf if empty
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhst,tbhd->sbhd", p, vals)
    return out, lse


def _rand(shape, dtype):
    return torch.randn(shape, device=DEV, dtype=torch.float32).to(dtype)


def _run_poisoned(q, kp, vp, ka, va, kb, vb, ar, scale, config=None):
    sq, b, hq, d = q.shape
    out = torch.full((sq, b, hq, d), float("nan"), device=DEV, dtype=q.dtype)
    lse = torch.full((b, hq, sq), float("nan"), device=DEV, dtype=torch.float32)
    res = attn_mod.apb_attention_impl(q, kp, vp, ka, va, kb, vb, anchor_rows=ar,
                                      softmax_scale=scale, config=config, out=out, lse=lse)
    torch.cuda.synchronize()
    assert res[0] is out and res[1] is lse
    return out, lse


def _check(out, lse, ref_out, ref_lse):
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    assert not torch.isnan(lse).any(), "unwritten or NaN lse"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty)
    assert (out[empty.permute(2, 0, 1)] == 0).all()
    rel = ((out.double() - ref_out).norm() / ref_out.norm()).item()
    assert rel < 1e-2, f"relative error {rel:.3e}"
    fin = ~empty
    if fin.any():
        err = (lse.double()[fin] - ref_lse[fin]).abs().max().item()
        assert err < 1e-3 * max(1.0, ref_lse[fin].abs().max().item()), f"lse error {err:.3e}"
    return rel


# (anchor_rows, n_pass, a, Lq, Lk, hq, hkv, d, dtype, config)
CASES = [
    (0, 0, 0, 1000, 1000, 28, 4, 128, torch.bfloat16, None),     # causal block, Qwen2.5-VL heads
    (130, 257, 130, 700, 700, 28, 4, 128, torch.bfloat16, None),  # full APB-V first block
    (0, 300, 77, 333, 777, 28, 4, 128, torch.bfloat16, None),     # second block style, Lk > Lq
    (0, 0, 0, 300, 100, 8, 8, 64, torch.bfloat16, None),          # Lk < Lq: empty rows, GQA 1
    (33, 65, 33, 257, 257, 7, 1, 64, torch.bfloat16, None),       # GQA 7, d 64
    (17, 41, 17, 300, 300, 8, 2, 128, torch.float16, None),       # fp16
    (19, 45, 19, 211, 233, 28, 4, 128, torch.bfloat16, (32, 16, 4, 2)),             # many tiles
    (130, 257, 130, 700, 700, 28, 4, 128, torch.bfloat16, (128, 64, 8, 3, False)),  # pointer path
    (130, 257, 130, 700, 700, 28, 4, 128, torch.bfloat16, (128, 64, 8, 3, True)),   # BLOCK_N 64
    (0, 0, 0, 1, 2049, 28, 4, 128, torch.bfloat16, None),         # one query row (decode-like)
    (0, 0, 0, 77, 0, 4, 1, 128, torch.bfloat16, None),            # nothing visible
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_apb_attention_gpu(case):
    ar, n_pass, a, lq, lk, hq, hkv, d, dtype, config = case
    torch.manual_seed(1000 + lq + lk + n_pass)
    b = 1 if hq >= 28 else 2
    sq = ar + lq
    q = _rand((sq, b, hq, d), dtype)
    kp, vp = _rand((n_pass, b, hkv, d), dtype), _rand((n_pass, b, hkv, d), dtype)
    ka, va = _rand((a, b, hkv, d), dtype), _rand((a, b, hkv, d), dtype)
    kb, vb = _rand((lk, b, hkv, d), dtype), _rand((lk, b, hkv, d), dtype)
    scale = d ** -0.5
    out, lse = _run_poisoned(q, kp, vp, ka, va, kb, vb, ar, scale, config)
    ref_out, ref_lse = ref_attention(q, kp, vp, ka, va, kb, vb, ar, scale)
    if ref_out.norm() == 0:
        assert (out == 0).all() and torch.isinf(lse).all()
        return
    _check(out, lse, ref_out, ref_lse)


def test_apb_attention_gpu_strided_views():
    """Seq-strided q, packed K/V (stride_h = 2d), sliced anchors; large logits."""
    torch.manual_seed(3)
    dtype = torch.bfloat16
    ar, n_pass, a, lq, lk, hq, hkv, d, b = 64, 100, 64, 333, 333, 28, 4, 128, 1
    sq = ar + lq
    q = _rand((2 * sq, b, hq, d), dtype)[1::2]
    kvb = _rand((lk, b, hkv, 2, d), dtype)
    kb, vb = kvb[:, :, :, 0], kvb[:, :, :, 1]
    kvp = _rand((n_pass + 5, b, hkv, 2, d), dtype)[5:]
    kp, vp = kvp[:, :, :, 0], kvp[:, :, :, 1]
    ka = _rand((a + 1, b, hkv, d), dtype)[1:]          # base not 16-byte aligned -> pointer path
    va = _rand((a, b, hkv, d), dtype)
    scale = 3.0 / math.sqrt(d)
    out, lse = _run_poisoned(q, kp, vp, ka, va, kb, vb, ar, scale)
    ref_out, ref_lse = ref_attention(q, kp, vp, ka, va, kb, vb, ar, scale)
    _check(out, lse, ref_out, ref_lse)


def test_apb_attention_gpu_public_api_matches_impl():
    torch.manual_seed(4)
    q = _rand((200, 1, 28, 128), torch.bfloat16)
    kb, vb = _rand((200, 1, 4, 128), torch.bfloat16), _rand((200, 1, 4, 128), torch.bfloat16)
    e = kb[:0]
    o1, l1 = K.apb_attention(q, e, e, e, e, kb, vb, anchor_rows=0, softmax_scale=0.088)
    o2, l2 = _run_poisoned(q, e, e, e, e, kb, vb, 0, 0.088)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    # pure causal block == SDPA causal
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3).float(), kb.permute(1, 2, 0, 3).float().repeat_interleave(7, 1),
        vb.permute(1, 2, 0, 3).float().repeat_interleave(7, 1), is_causal=True, scale=0.088)
    rel = (o1.float().permute(1, 2, 0, 3) - ref).norm() / ref.norm()
    assert rel < 1e-2


def test_merge_partials_gpu():
    torch.manual_seed(5)
    W, sq, b, h, d = 4, 333, 1, 28, 128
    outs = _rand((W, sq, b, h, d), torch.bfloat16)
    lses = torch.randn((W, b, h, sq), device=DEV) * 10
    dead = torch.rand((W, b, h, sq), device=DEV) < 0.25
    lses[dead] = -math.inf
    outs[dead.permute(0, 3, 1, 2)] = float("nan")
    lses[:, 0, 3, 17] = -math.inf
    out, lse = K.merge_partials(outs, lses)
    lw = lses.double()
    ref_lse = torch.logsumexp(lw, 0)
    w = torch.where(torch.isinf(lw), 0.0, torch.exp(lw - ref_lse[None]).nan_to_num(0.0))
    o = torch.where(dead.permute(0, 3, 1, 2)[..., None], 0.0, outs.double())
    ref_out = (w.permute(0, 3, 1, 2)[..., None] * o).sum(0)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (out[17, 0, 3] == 0).all()
    fin = ~torch.isinf(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-4
    assert (out.double() - ref_out).norm() / ref_out.norm() < 1e-2


@pytest.mark.parametrize("L,window", [(1, 5), (1000, 5), (4097, 5), (333, 7)])
def test_passing_scores_gpu(L, window):
    torch.manual_seed(L)
    nq, b, hq, hkv, d = 37, 1, 28, 4, 128
    q_query = _rand((nq, b, hq, d), torch.bfloat16)
    k_block = _rand((L, b, hkv, d), torch.bfloat16)
    got = K.passing_scores(q_query, k_block, window=window)
    qbar = q_query.double().reshape(nq, b, hkv, hq // hkv, d).mean(dim=(0, 3))
    raw = torch.einsum("tbhd,bhd->bht", k_block.double(), qbar)
    half = window // 2
    ref = torch.nn.functional.max_pool1d(raw, window, stride=1, padding=half)  # pads with -inf
    assert got.shape == (b, hkv, L) and torch.isfinite(got).all()
    assert (got.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("L,p", [(4097, 256), (300, 1024), (1000, 0)])
def test_select_passing_gpu(L, p):
    torch.manual_seed(L + p)
    b, hkv, d = 1, 4, 128
    k_block = _rand((L, b, hkv, d), torch.bfloat16)
    v_block = _rand((L, b, hkv, d), torch.bfloat16)
    scores = torch.randn((b, hkv, L), device=DEV)
    n = min(p, L)
    k_sel, v_sel = K.select_passing(k_block, v_block, scores, p)
    assert k_sel.shape == (n, b, hkv, d) and v_sel.shape == (n, b, hkv, d)
    if n == 0:
        return
    for h in range(hkv):
        ref_idx = torch.topk(scores[0, h], n).indices
        ref_k = k_block[ref_idx, 0, h].float()
        ref_v = v_block[ref_idx, 0, h].float()
        # order unspecified: compare as sorted sets of rows via their scores
        got_idx = (k_sel[:, 0, h].float() @ k_block[:, 0, h].float().T).argmax(1)  # self-match
        assert sorted(got_idx.tolist()) == sorted(ref_idx.tolist())
        assert torch.equal(k_sel[:, 0, h].float(), k_block[got_idx, 0, h].float())
        assert torch.equal(v_sel[:, 0, h].float(), v_block[got_idx, 0, h].float())
        assert ref_k.shape == ref_v.shape


# Head dims other than 128: the Triton kernel pads the tile to the next power of two and masks
# the padding (pointer loads; TMA needs d == padded d). d = 80 is Qwen2.5-VL's vision tower.
@pytest.mark.parametrize("d", [64, 80, 96])
@pytest.mark.parametrize("hq,hkv", [(16, 16), (28, 4), (7, 1)])
def test_apb_attention_gpu_head_dims(d, hq, hkv):
    torch.manual_seed(d + hq)
    ar, n_pass, a, lq, lk = 65, 131, 65, 301, 301
    sq, b = ar + lq, 1
    q = _rand((sq, b, hq, d), torch.bfloat16)
    kp, vp = _rand((n_pass, b, hkv, d), torch.bfloat16), _rand((n_pass, b, hkv, d), torch.bfloat16)
    ka, va = _rand((a, b, hkv, d), torch.bfloat16), _rand((a, b, hkv, d), torch.bfloat16)
    kb, vb = _rand((lk, b, hkv, d), torch.bfloat16), _rand((lk, b, hkv, d), torch.bfloat16)
    out, lse = _run_poisoned(q, kp, vp, ka, va, kb, vb, ar, d ** -0.5)
    _check(out, lse, *ref_attention(q, kp, vp, ka, va, kb, vb, ar, d ** -0.5))


def _poison_allocator(nbytes=1 << 30):
    """Fill the caching allocator's free memory with NaN so outputs a route allocates start as NaN."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    junk = torch.full((nbytes // 4,), float("nan"), device=DEV)  # large pool (> 1 MiB allocations)
    small = [torch.full((1 << 17,), float("nan"), device=DEV) for _ in range(64)]  # small pool (LSE rows)
    del junk, small  # the blocks go back to the cache, NaN-filled, and are handed to the next allocations
    torch.cuda.synchronize()


def _cudnn_ok():
    from megatron_apbv.apbv.attention_routes import cudnn_op_available

    return cudnn_op_available()


# (anchor_rows, n_pass, a, L, hq, hkv, d): the cuDNN route needs as many block keys as block rows
CUDNN_CASES = [
    (0, 0, 0, 1000, 28, 4, 128),        # causal block only
    (0, 300, 77, 777, 28, 4, 128),      # second block: passing + anchor + block
    (0, 0, 129, 513, 28, 4, 128),       # empty passing
    (0, 257, 0, 513, 28, 4, 128),       # empty anchor
    (130, 257, 130, 700, 28, 4, 128),   # first block: anchor rows on Triton, block rows on cuDNN
    (33, 65, 33, 257, 7, 1, 128),       # GQA 7
    (0, 100, 50, 333, 8, 8, 128),       # GQA 1
    (17, 41, 17, 301, 16, 2, 64),       # d 64
]


@pytest.mark.skipif(torch.cuda.is_available() and not _cudnn_ok(), reason="no cuDNN attention op")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CUDNN_CASES, ids=[f"cudnn{i}" for i in range(len(CUDNN_CASES))])
def test_cudnn_route_gpu(case, dtype):
    from megatron_apbv.apbv.cudnn_attention import cudnn_block_attention

    ar, n_pass, a, lq, hq, hkv, d = case
    torch.manual_seed(2000 + lq + n_pass)
    b = 1
    q = _rand((ar + lq, b, hq, d), dtype)
    kp, vp = _rand((n_pass, b, hkv, d), dtype), _rand((n_pass, b, hkv, d), dtype)
    ka, va = _rand((a, b, hkv, d), dtype), _rand((a, b, hkv, d), dtype)
    kb, vb = _rand((lq, b, hkv, d), dtype), _rand((lq, b, hkv, d), dtype)
    scale = d ** -0.5
    _poison_allocator()
    out, lse = cudnn_block_attention(K.apb_attention, q, kp, vp, ka, va, kb, vb, anchor_rows=ar,
                                     softmax_scale=scale)
    torch.cuda.synchronize()
    assert out.shape == q.shape and lse.shape == (b, hq, ar + lq) and lse.dtype == torch.float32
    _check(out, lse, *ref_attention(q, kp, vp, ka, va, kb, vb, ar, scale))


@pytest.mark.skipif(torch.cuda.is_available() and not _cudnn_ok(), reason="no cuDNN attention op")
def test_dispatch_takes_the_measured_route_gpu(monkeypatch):
    """apb_attention on CUDA takes the route the table names (threshold lowered to test shapes) and is exact."""
    from megatron_apbv.apbv import attention_routes
    from megatron_apbv.apbv.attend import apb_attention
    from megatron_apbv.apbv.attention_routes import CUDNN, TRITON, route_for

    gen = torch.cuda.get_device_capability()[0]
    monkeypatch.setitem(attention_routes.MEASURED, (gen, 128), {"cudnn_from_rows": 256, "tflops": {}})
    torch.manual_seed(7)
    ar, n_pass, a, lq, hq, hkv, d = 64, 200, 64, 400, 28, 4, 128
    q = _rand((ar + lq, 1, hq, d), torch.bfloat16)
    kp, vp = _rand((n_pass, 1, hkv, d), torch.bfloat16), _rand((n_pass, 1, hkv, d), torch.bfloat16)
    ka, va = _rand((a, 1, hkv, d), torch.bfloat16), _rand((a, 1, hkv, d), torch.bfloat16)
    kb, vb = _rand((lq, 1, hkv, d), torch.bfloat16), _rand((lq, 1, hkv, d), torch.bfloat16)
    route = route_for(q.device, q.dtype, d, rows=ar + lq, anchor_rows=ar, n_pass=n_pass, n_anchor=a, n_block=lq)
    assert (route.anchor_rows, route.block_rows) == (TRITON, CUDNN)
    _poison_allocator()
    out, lse = apb_attention(q, kp, vp, ka, va, kb, vb, anchor_rows=ar, softmax_scale=d ** -0.5)
    _check(out, lse, *ref_attention(q, kp, vp, ka, va, kb, vb, ar, d ** -0.5))
    # bottom-right causal (more block keys than rows) is not a cuDNN mask: Triton
    route = route_for(q.device, q.dtype, d, rows=lq, anchor_rows=0, n_pass=0, n_anchor=0, n_block=lq + 5)
    assert route.block_rows == TRITON


def test_merge_pair_gpu():
    """Two separate partials (one a [b, h, s, d] view, as cuDNN returns) merged into row slices."""
    torch.manual_seed(9)
    sq, b, h, d = 333, 1, 28, 128
    a = _rand((sq, b, h, d), torch.bfloat16)
    bt = _rand((b, h, sq, d), torch.bfloat16).permute(2, 0, 1, 3)
    la, lb = torch.randn((b, h, sq), device=DEV) * 10, torch.randn((b, h, sq), device=DEV) * 10
    la[0, 3, :17] = -math.inf
    out = torch.full((sq + 5, b, h, d), float("nan"), device=DEV, dtype=torch.bfloat16)
    lse = torch.full((b, h, sq + 5), float("nan"), device=DEV)
    K.merge_pair(a, la, bt, lb, out=out[5:], lse=lse[:, :, 5:])
    ref_out, ref_lse = K.merge_partials(torch.stack([a, bt]), torch.stack([la, lb]))
    assert torch.isnan(out[:5]).all() and not torch.isnan(out[5:]).any()
    assert (lse[:, :, 5:] - ref_lse).abs().max() < 1e-5
    assert (out[5:].float() - ref_out.float()).abs().max() < 2e-2
