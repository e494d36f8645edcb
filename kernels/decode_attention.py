"""Decode attention over a preallocated KV cache: flash-decoding split-K, then an exact LSE merge.

A few new query tokens (``t``) of ``b`` sequences attend to their cache
``[capacity, b, hkv, d]`` whose valid length per sequence is read from a device
tensor, so one compiled launch serves every step (and can be captured in a CUDA
graph). One program handles one (sequence, KV head, key split): it loads each
K/V tile of its split once for the whole GQA group (``hq / hkv`` heads x ``t``
tokens as the rows of one ``tl.dot``), runs an online softmax over the split and
writes a partial ``(out, lse)``; a second kernel combines the splits by log-sum-exp.
The split count depends on the capacity (static), not on the lengths: splits past
a sequence's end write ``lse = -inf`` and are ignored by the merge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# constexpr: compiled Triton refuses plain module globals inside @jit (the interpreter accepts them)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

BLOCK_N = 64
# Enough programs to keep every SM streaming the cache: (b x hkv x splits) ~ this many per SM.
PROGRAMS_PER_SM = 4
MIN_SPLIT_KEYS = 256


@triton.jit
def _decode_split_kernel(
    Q, K, V, LENS, TAIL, O, L,
    s_qt, s_qb, s_qh,
    s_kn, s_kb, s_kh,
    s_vn, s_vb, s_vh,
    s_os, s_ot, s_ob, s_oh,
    s_ls, s_lb, s_lh,
    n_kv_heads, split_len, qk_scale,
    T: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // n_kv_heads).to(tl.int64)
    h = (pid % n_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    g = rows // T  # query head within the group
    j = rows % T  # new token
    row_ok = rows < GROUP * T
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_head = h * GROUP + g
    q_ptr = Q + j[:, None] * s_qt + b * s_qb + q_head[:, None] * s_qh + offs_d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    kv_len = tl.load(LENS + b).to(tl.int32)
    tail = tl.load(TAIL + b).to(tl.int32)
    # token j sees keys < kv_len - (t - 1 - j) when the last t keys are the new tokens (causal), else all
    bound = kv_len - tail * (T - 1 - j)
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < end
        kv_off = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_base + kv_off * s_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        vis = n_ok[None, :] & (offs_n[None, :] < bound[:, None])
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_off * s_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    out = acc / l_div[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_div)) * _LN2)
    o_ptr = O + split * s_os + j[:, None] * s_ot + b * s_ob + q_head[:, None] * s_oh + offs_d[None, :]
    tl.store(o_ptr, out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(L + split * s_ls + b * s_lb + q_head * s_lh + j, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    OUTS, LSES, O, L,
    n_splits, n_heads,
    s_is, s_it, s_ib, s_ih,
    s_ls, s_lb, s_lh,
    s_ot, s_ob, s_oh,
    s_mb, s_mh,
    T: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # one program per (token, sequence, query head): all splits at once, BLOCK_S at a time
    pid = tl.program_id(0)
    j = pid % T
    bh = pid // T
    h = (bh % n_heads).to(tl.int64)
    b = (bh // n_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    l_base = LSES + b * s_lb + h * s_lh + j
    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        m_vec = tl.maximum(m_vec, tl.load(l_base + (s0 + offs_s) * s_ls, mask=s0 + offs_s < n_splits,
                                          other=float("-inf")))
    m = tl.max(m_vec, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    o_base = OUTS + j * s_it + b * s_ib + h * s_ih
    for s0 in range(0, n_splits, BLOCK_S):
        split = s0 + offs_s
        lw = tl.load(l_base + split * s_ls, mask=split < n_splits, other=float("-inf"))
        live = lw != float("-inf")
        w = tl.where(live, tl.exp(lw - m_use), 0.0)
        ow = tl.load(o_base + split.to(tl.int64)[:, None] * s_is + offs_d[None, :],
                     mask=live[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * ow, 0)
        den += w
    total = tl.sum(den, 0)
    empty = total == 0.0
    total_div = tl.where(empty, 1.0, total)
    out = acc / total_div
    lse = tl.where(empty, float("-inf"), m_use + tl.log(total_div))
    tl.store(O + j * s_ot + b * s_ob + h * s_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(L + b * s_mb + h * s_mh + j, lse)


def num_splits(capacity: int, batch: int, kv_heads: int, device: torch.device) -> int:
    """Key splits per (sequence, KV head): enough programs for every SM, each split >= MIN_SPLIT_KEYS keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, max(batch * kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(capacity, MIN_SPLIT_KEYS)))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, tail: torch.Tensor,
    *, softmax_scale: float, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``megatron_apbv.apbv.decode.decode_attention``: ``(out [t, b, hq, d], lse [b, hq, t])``."""
    t, b, hq, d = q.shape
    capacity, _, hkv, _ = k_cache.shape
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in the head dimension")
    group = hq // hkv
    if splits is None:
        splits = num_splits(capacity, b, hkv, q.device)
    split_len = triton.cdiv(triton.cdiv(capacity, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(capacity, split_len)
    outs = torch.empty((splits, t, b, hq, d), dtype=torch.float32, device=q.device)
    lses = torch.empty((splits, b, hq, t), dtype=torch.float32, device=q.device)
    d_pad = max(16, triton.next_power_of_2(d))
    block_m = max(16, triton.next_power_of_2(group * t))
    _decode_split_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, lengths, tail, outs, lses,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        outs.stride(0), outs.stride(1), outs.stride(2), outs.stride(3),
        lses.stride(0), lses.stride(1), lses.stride(2),
        hkv, split_len, softmax_scale * _LOG2E.value,
        T=t, GROUP=group, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=3,
    )
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    _combine_splits_kernel[(t * b * hq,)](
        outs, lses, out, lse, splits, hq,
        outs.stride(0), outs.stride(1), outs.stride(2), outs.stride(3),
        lses.stride(0), lses.stride(1), lses.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        T=t, HEAD_DIM=d, D_PAD=d_pad, BLOCK_S=32, num_warps=4,
    )
    return out, lse


__all__ = ["decode_attention", "num_splits"]
