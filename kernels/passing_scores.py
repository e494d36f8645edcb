"""APB-V key scoring (dot with the mean query, then max-pool) and top-p selection.

``passing_scores``: ``qbar[b, h]`` is the fp32 mean of the query-token queries
over the GQA group of KV head ``h`` and over the query tokens; the score of key
``t`` is ``<k[t, b, h], qbar[b, h]>`` in fp32, then max-pooled with an odd
window (stride 1, same padding, positions outside the block ignored).

One Triton program scores ``BLOCK_T`` consecutive keys (the tile plus a halo of
``window // 2`` on each side, recomputed by the neighbours) and pools them in
registers, so the raw scores never go to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _score_pool_kernel(
    K, QBAR, OUT,
    L, n_kv, out_per_prog,
    s_kt, s_kb, s_kh, s_kd,
    s_qb, s_qh,
    s_ob, s_oh, s_ot,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_kv).to(tl.int64)
    h = (bh % n_kv).to(tl.int64)
    t0 = pid_t * out_per_prog - HALF               # first key scored here
    offs = tl.arange(0, BLOCK_T)
    t = t0 + offs
    t_ok = (t >= 0) & (t < L)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    qbar = tl.load(QBAR + b * s_qb + h * s_qh + offs_d, mask=d_ok, other=0.0)
    kp = K + b * s_kb + h * s_kh + t[:, None].to(tl.int64) * s_kt + offs_d[None, :] * s_kd
    k = tl.load(kp, mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    s = tl.sum(k * qbar[None, :], axis=1)
    s = tl.where(t_ok, s, float("-inf"))
    # pooled[i] = max_{|j - i| <= HALF} s[j]   (register-only window max)
    dist = offs[None, :] - offs[:, None]
    win = (dist <= HALF) & (dist >= -HALF)
    pooled = tl.max(tl.where(win, s[None, :], float("-inf")), axis=1)
    keep = (offs >= HALF) & (offs < HALF + out_per_prog) & t_ok
    op = OUT + b * s_ob + h * s_oh + t.to(tl.int64) * s_ot
    tl.store(op, pooled, mask=keep)


def query_mean(q_query: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """fp32 mean of ``q_query [q, b, hq, d]`` over query tokens and GQA group: ``[b, hkv, d]``."""
    nq, b, hq, d = q_query.shape
    g = hq // n_kv_heads
    return q_query.float().view(nq, b, n_kv_heads, g, d).mean(dim=(0, 3))


def passing_scores(q_query: torch.Tensor, k_block: torch.Tensor, *, window: int) -> torch.Tensor:
    """Pooled per-key scores ``[b, hkv, L]`` (float32) of one context block.

    Args:
        q_query: ``[q, b, hq, d]`` queries of the query tokens (after RoPE).
        k_block: ``[L, b, hkv, d]`` keys of one context block.
        window: odd max-pool window (stride 1, same padding, -inf past the edges).
    """
    if window < 1 or window % 2 != 1:
        raise ValueError(f"window must be odd and >= 1, got {window}")
    nq, b, hq, d = q_query.shape
    L, bk, hkv, dk = k_block.shape
    if bk != b or dk != d or hkv == 0 or hq % hkv != 0:
        raise ValueError(f"shapes do not match: q {tuple(q_query.shape)}, k {tuple(k_block.shape)}")
    if nq == 0:
        raise ValueError("q_query holds no query token")
    out = torch.empty((b, hkv, L), dtype=torch.float32, device=k_block.device)
    if L == 0 or b == 0:
        return out
    qbar = query_mean(q_query, hkv).contiguous()
    half = window // 2
    block_t = max(64, triton.next_power_of_2(4 * half + 1))
    if k_block.device.type == "cuda":
        block_t = max(block_t, 128)
    out_per_prog = block_t - 2 * half
    d_pad = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(L, out_per_prog), b * hkv)
    _score_pool_kernel[grid](
        k_block, qbar, out, L, hkv, out_per_prog,
        *k_block.stride(), qbar.stride(0), qbar.stride(1), *out.stride(),
        HALF=half, HEAD_DIM=d, D_PAD=d_pad, BLOCK_T=block_t,
        num_warps=8 if block_t >= 128 else 4,
    )
    return out


@triton.jit
def _gather_kernel(
    K, V, IDX, KO, VO,
    P, n_kv,
    s_kt, s_kb, s_kh, s_kd,
    s_vt, s_vb, s_vh, s_vd,
    s_ib, s_ih, s_ip,
    s_ot, s_ob, s_oh, s_od,
    s_wt, s_wb, s_wh, s_wd,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_kv).to(tl.int64)
    h = (bh % n_kv).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    offs_d = tl.arange(0, D_PAD)
    msk = p_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    idx = tl.load(IDX + b * s_ib + h * s_ih + offs_p * s_ip, mask=p_ok, other=0).to(tl.int64)
    k = tl.load(K + b * s_kb + h * s_kh + idx[:, None] * s_kt + offs_d[None, :] * s_kd, mask=msk)
    v = tl.load(V + b * s_vb + h * s_vh + idx[:, None] * s_vt + offs_d[None, :] * s_vd, mask=msk)
    rows = offs_p[:, None].to(tl.int64)
    tl.store(KO + b * s_ob + h * s_oh + rows * s_ot + offs_d[None, :] * s_od, k, mask=msk)
    tl.store(VO + b * s_wb + h * s_wh + rows * s_wt + offs_d[None, :] * s_wd, v, mask=msk)


def _tie_break_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (score descending, position ascending).

    The fp32 bits are mapped to an int32 with the same order as the floats
    (negative values get their magnitude bits flipped), shifted into the high
    word; the low word holds ``L - 1 - t``, so equal scores prefer small ``t``.
    """
    L = scores.shape[-1]
    s = scores.float().contiguous() + 0.0          # -0.0 -> +0.0
    bits = s.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    pos = torch.arange(L - 1, -1, -1, device=scores.device, dtype=torch.int64)
    return (key.to(torch.int64) << 32) | pos


def select_passing(k_block: torch.Tensor, v_block: torch.Tensor, scores: torch.Tensor, p: int):
    """Top-``min(p, L)`` keys per KV head by score; gathered K/V ``[min(p, L), b, hkv, d]``.

    Ties (frequent after max-pooling) go to the earlier token, as with a stable
    descending sort, so the selected set is deterministic. The order inside the
    selection is unspecified (RoPE is already applied).
    """
    L, b, hkv, d = k_block.shape
    if v_block.shape != k_block.shape:
        raise ValueError("k_block and v_block shapes differ")
    if scores.shape != (b, hkv, L):
        raise ValueError(f"scores {tuple(scores.shape)} must be [b, hkv, L] = {(b, hkv, L)}")
    n = max(0, min(int(p), L))
    k_sel = torch.empty((n, b, hkv, d), dtype=k_block.dtype, device=k_block.device)
    v_sel = torch.empty((n, b, hkv, d), dtype=v_block.dtype, device=v_block.device)
    if n == 0 or b == 0 or hkv == 0:
        return k_sel, v_sel
    idx = torch.topk(_tie_break_keys(scores), n, dim=-1, largest=True, sorted=False).indices
    block_p = 32
    d_pad = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(n, block_p), b * hkv)
    _gather_kernel[grid](
        k_block, v_block, idx, k_sel, v_sel, n, hkv,
        *k_block.stride(), *v_block.stride(), *idx.stride(),
        *k_sel.stride(), *v_sel.stride(),
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_P=block_p, num_warps=4,
    )
    return k_sel, v_sel


__all__ = ["passing_scores", "select_passing", "query_mean"]
