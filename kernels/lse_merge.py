"""Exact log-sum-exp merge of partial attention outputs.

Given ``W`` partials of the same queries over disjoint key sets, with outputs
``out_w`` (normalised) and natural-log ``lse_w``, the merged result is

    lse = log(sum_w exp(lse_w)),   out = sum_w exp(lse_w - lse) * out_w.

Computed with the running maximum subtracted first; partials with
``lse = -inf`` get weight 0 (their ``out`` is never read into the sum, so
garbage or NaN there does no harm); all ``-inf`` gives ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    OUTS, LSES, O, LSE,
    n_parts, sq, n_heads,
    s_iw, s_is, s_ib, s_ih, s_id,
    s_lw, s_lb, s_lh, s_ls,
    s_os, s_ob, s_oh, s_od,
    s_mb, s_mh, s_ms,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < sq
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    rows = offs_s.to(tl.int64)

    m = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    l_cur = LSES + b * s_lb + h * s_lh
    for w in range(0, n_parts):
        lw = tl.load(l_cur + rows * s_ls, mask=s_ok, other=float("-inf"))
        m = tl.maximum(m, lw)
        l_cur += s_lw
    m_use = tl.where(m == float("-inf"), 0.0, m)

    acc = tl.zeros([BLOCK_S, D_PAD], dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    o_cur = OUTS + b * s_ib + h * s_ih      # scalar pointer, advanced by one partial
    l_cur = LSES + b * s_lb + h * s_lh
    o_offs = rows[:, None] * s_is + offs_d[None, :] * s_id
    for w in range(0, n_parts):
        lw = tl.load(l_cur + rows * s_ls, mask=s_ok, other=float("-inf"))
        wt = tl.exp(lw - m_use)                      # 0 for lse = -inf
        live = s_ok & (lw != float("-inf"))
        ow = tl.load(o_cur + o_offs, mask=live[:, None] & d_ok[None, :], other=0.0)
        acc += wt[:, None] * ow.to(tl.float32)
        den += wt
        o_cur += s_iw
        l_cur += s_lw
    empty = den == 0.0
    den_div = tl.where(empty, 1.0, den)
    out = acc / den_div[:, None]
    lse = tl.where(empty, float("-inf"), m_use + tl.log(den_div))
    op = O + b * s_ob + h * s_oh + rows[:, None] * s_os + offs_d[None, :] * s_od
    tl.store(op, out.to(O.dtype.element_ty), mask=s_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * s_mb + h * s_mh + rows * s_ms, lse, mask=s_ok)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor):
    """Merge ``outs [W, sq, b, h, d]`` / ``lses [W, b, h, sq]`` (fp32) into ``(out, lse)``.

    ``out`` is ``[sq, b, h, d]`` in ``outs``' dtype, ``lse`` ``[b, h, sq]`` float32.
    """
    if outs.dim() != 5 or lses.dim() != 4:
        raise ValueError("outs must be [W, sq, b, h, d] and lses [W, b, h, sq]")
    W, sq, b, h, d = outs.shape
    if tuple(lses.shape) != (W, b, h, sq):
        raise ValueError(f"lses {tuple(lses.shape)} must be {(W, b, h, sq)}")
    if lses.dtype != torch.float32:
        lses = lses.float()
    out = torch.empty((sq, b, h, d), dtype=outs.dtype, device=outs.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=outs.device)
    if sq == 0 or b == 0 or h == 0:
        return out, lse
    if W == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    d_pad = max(16, triton.next_power_of_2(d))
    block_s = 32 if d_pad <= 128 else 16
    grid = (triton.cdiv(sq, block_s), b * h)
    _merge_kernel[grid](
        outs, lses, out, lse, W, sq, h,
        *outs.stride(), *lses.stride(), *out.stride(), *lse.stride(),
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_S=block_s, num_warps=4,
    )
    return out, lse


@triton.jit
def _merge_pair_kernel(
    OA, LA, OB, LB, O, LSE, sq, n_heads,
    s_as, s_ab, s_ah, s_ad, s_lab, s_lah, s_las,
    s_bs, s_bb, s_bh, s_bd, s_lbb, s_lbh, s_lbs,
    s_os, s_ob, s_oh, s_od, s_mb, s_mh, s_ms,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = (pid * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    s_ok = rows < sq
    offs_d = tl.arange(0, D_PAD)
    dm = s_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    la = tl.load(LA + b * s_lab + h * s_lah + rows * s_las, mask=s_ok, other=float("-inf"))
    lb = tl.load(LB + b * s_lbb + h * s_lbh + rows * s_lbs, mask=s_ok, other=float("-inf"))
    m = tl.maximum(la, lb)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_use)  # 0 for lse = -inf: that partial's out is never read
    wb = tl.exp(lb - m_use)
    oa = tl.load(OA + b * s_ab + h * s_ah + rows[:, None] * s_as + offs_d[None, :] * s_ad,
                 mask=dm & (la != float("-inf"))[:, None], other=0.0)
    ob = tl.load(OB + b * s_bb + h * s_bh + rows[:, None] * s_bs + offs_d[None, :] * s_bd,
                 mask=dm & (lb != float("-inf"))[:, None], other=0.0)
    den = wa + wb
    empty = den == 0.0
    den_div = tl.where(empty, 1.0, den)
    out = (wa[:, None] * oa.to(tl.float32) + wb[:, None] * ob.to(tl.float32)) / den_div[:, None]
    lse = tl.where(empty, float("-inf"), m_use + tl.log(den_div))
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_os + offs_d[None, :] * s_od, out.to(O.dtype.element_ty),
             mask=dm)
    tl.store(LSE + b * s_mb + h * s_mh + rows * s_ms, lse, mask=s_ok)


def merge_pair(out_a, lse_a, out_b, lse_b, *, out=None, lse=None):
    """:func:`merge_partials` of two partials given as separate tensors (any strides): no stacking copy.

    ``out_*`` ``[sq, b, h, d]``, ``lse_*`` ``[b, h, sq]`` fp32. ``out`` / ``lse``, when
    given, receive the result (e.g. row slices of a larger output); returns ``(out, lse)``.
    """
    sq, b, h, d = out_a.shape
    if tuple(out_b.shape) != (sq, b, h, d) or tuple(lse_a.shape) != (b, h, sq) or tuple(lse_b.shape) != (b, h, sq):
        raise ValueError(f"partials {tuple(out_a.shape)}/{tuple(out_b.shape)} with lse {tuple(lse_a.shape)}/"
                         f"{tuple(lse_b.shape)} do not match")
    if lse_a.dtype != torch.float32 or lse_b.dtype != torch.float32:
        raise ValueError("lse must be float32")
    if out is None:
        out = torch.empty((sq, b, h, d), dtype=out_a.dtype, device=out_a.device)
    if lse is None:
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=out_a.device)
    if sq == 0 or b == 0 or h == 0:
        return out, lse
    d_pad = max(16, triton.next_power_of_2(d))
    block_s = 32 if d_pad <= 128 else 16
    grid = (triton.cdiv(sq, block_s), b * h)
    _merge_pair_kernel[grid](
        out_a, lse_a, out_b, lse_b, out, lse, sq, h,
        *out_a.stride(), *lse_a.stride(), *out_b.stride(), *lse_b.stride(), *out.stride(), *lse.stride(),
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_S=block_s, num_warps=4,
    )
    return out, lse


__all__ = ["merge_pair", "merge_partials"]
