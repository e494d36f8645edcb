"""Decode attention over a preallocated KV cache: flash-decoding split-K, then an exact LSE merge.

A few new query tokens (``t``) of ``b`` sequences attend to their cache
``[capacity, b, hkv, d]`` whose valid length per sequence is read from a device
tensor, so one compiled launch serves every step (and can be captured in a CUDA
graph). One program handles one (sequence, KV head, key split): it loads each
K/V tile of its split once for the whole GQA group (``hq / hkv`` heads x ``t``
tokens as the rows of one ``tl.dot``), runs an online softmax over the split and
writes a partial ``(out, lse)``. The splits are then combined by log-sum-exp, either
inside the same launch (``combine="in_kernel"``): each program counts itself
done on a per-(sequence, KV head) counter, and the last one of a group merges the
group's partials (all rows of the GQA group, several splits per load) and resets
the counter, so the counters are zero again after every call (CUDA-graph safe).
or, by default, as a second, wide launch (``combine="kernel"``: one program per
(token, sequence, query head, 32 columns), every split in one load): measured on an H100
(benchmarks/results/decode_gpu.json, kernel_rows) the separate merge takes 0.030 / 0.096 / 0.19 ms
at 32K / 128K / batch 8 x 32K where the in-kernel one takes 0.127 / 0.19 / 0.24 ms, since the
in-kernel merge waits for the slowest split of its group and then runs serially. The split count
depends on the capacity (static), not on the lengths: splits past a sequence's end
write ``lse = -inf`` and are ignored by the merge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# constexpr: compiled Triton refuses plain module globals inside @jit (the interpreter accepts them)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

BLOCK_N = 64
# Enough programs to keep every SM streaming the cache: (b x hkv x splits) ~ this many per SM. The in-kernel
# combine is serial in its last program, so it wants fewer, longer splits than the separate combine.
PROGRAMS_PER_SM = {"in_kernel": 2, "kernel": 4}
MIN_SPLIT_KEYS = 256
COMBINES = ("in_kernel", "kernel")
DEFAULT_COMBINE = "kernel"  # the faster one on every shape measured (module docstring)


@triton.jit
def _decode_split_kernel(
    Q, K, V, LENS, TAIL, O, L, COUNT, FO, FL,
    s_qt, s_qb, s_qh,
    s_kn, s_kb, s_kh,
    s_vn, s_vb, s_vh,
    s_os, s_ot, s_ob, s_oh,
    s_ls, s_lb, s_lh,
    s_fot, s_fob, s_foh, s_flb, s_flh,
    n_kv_heads, split_len, n_splits, qk_scale,
    T: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    FUSED_COMBINE: tl.constexpr, CHUNK_S: tl.constexpr,
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
    if FUSED_COMBINE:
        # every thread's partial is stored before one thread releases the count (cumulative release)
        tl.debug_barrier()
        done = tl.atomic_add(COUNT + pid, 1, sem="acq_rel", scope="gpu")
        if done == n_splits - 1:
            tl.debug_barrier()  # the acquire (one thread) before any thread reads the others' partials
            _combine_group(O, L, FO, FL, b, q_head, j, row_ok, offs_d, d_ok, n_splits,
                           s_os, s_ot, s_ob, s_oh, s_ls, s_lb, s_lh, s_fot, s_fob, s_foh, s_flb, s_flh,
                           BLOCK_M, D_PAD, CHUNK_S)
            tl.atomic_xchg(COUNT + pid, 0, sem="relaxed", scope="gpu")  # ready for the next call


@triton.jit
def _combine_group(O, L, FO, FL, b, q_head, j, row_ok, offs_d, d_ok, n_splits,
                   s_os, s_ot, s_ob, s_oh, s_ls, s_lb, s_lh, s_fot, s_fob, s_foh, s_flb, s_flh,
                   BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, CHUNK_S: tl.constexpr):
    # the LSE merge of one GQA group's rows over all splits in one pass (running max), CHUNK_S splits per load
    # ([CHUNK_S, rows, d] tiles); .cg loads read L2, where the other programs' partials are, never a stale L1 line
    offs_s = tl.arange(0, CHUNK_S)
    l_rows = b * s_lb + q_head * s_lh + j  # [BLOCK_M]
    o_rows = j[:, None] * s_ot + b * s_ob + q_head[:, None] * s_oh + offs_d[None, :]  # [BLOCK_M, D_PAD]
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s0 in range(0, n_splits, CHUNK_S):
        sp = s0 + offs_s
        ok = (sp < n_splits)[:, None] & row_ok[None, :]
        ls = tl.load(L + sp.to(tl.int64)[:, None] * s_ls + l_rows[None, :], mask=ok, other=float("-inf"),
                     cache_modifier=".cg")
        live = ls != float("-inf")
        ow = tl.load(O + sp.to(tl.int64)[:, None, None] * s_os + o_rows[None, :, :],
                     mask=live[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(ls, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)  # 0 while nothing was seen (m = -inf)
        w = tl.where(live, tl.exp(ls - m_use[None, :]), 0.0)  # [CHUNK_S, BLOCK_M]
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * ow, 0)
        den = den * alpha + tl.sum(w, 0)
        m = m_new
    m_use = tl.where(m == float("-inf"), 0.0, m)
    empty = den == 0.0
    den_div = tl.where(empty, 1.0, den)
    out = acc / den_div[:, None]
    lse = tl.where(empty, float("-inf"), m_use + tl.log(den_div))
    fo = FO + j[:, None] * s_fot + b * s_fob + q_head[:, None] * s_foh + offs_d[None, :]
    tl.store(fo, out.to(FO.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(FL + b * s_flb + q_head * s_flh + j, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    OUTS, LSES, O, L,
    n_splits, n_heads,
    s_is, s_it, s_ib, s_ih,
    s_ls, s_lb, s_lh,
    s_ot, s_ob, s_oh,
    s_mb, s_mh,
    T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # one program per (token, sequence, query head) x BLOCK_D columns: every split in one [BLOCK_S, BLOCK_D] load
    pid = tl.program_id(0)
    j = pid % T
    bh = pid // T
    h = (bh % n_heads).to(tl.int64)
    b = (bh // n_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    s_ok = offs_s < n_splits
    lw = tl.load(LSES + b * s_lb + h * s_lh + j + offs_s.to(tl.int64) * s_ls, mask=s_ok, other=float("-inf"))
    m = tl.max(lw, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    live = lw != float("-inf")
    w = tl.where(live, tl.exp(lw - m_use), 0.0)
    ow = tl.load(OUTS + j * s_it + b * s_ib + h * s_ih + offs_s.to(tl.int64)[:, None] * s_is + offs_d[None, :],
                 mask=live[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    empty = total == 0.0
    total_div = tl.where(empty, 1.0, total)
    out = tl.sum(w[:, None] * ow, 0) / total_div
    tl.store(O + j * s_ot + b * s_ob + h * s_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    if tl.program_id(1) == 0:
        tl.store(L + b * s_mb + h * s_mh + j, tl.where(empty, float("-inf"), m_use + tl.log(total_div)))


def num_splits(capacity: int, batch: int, kv_heads: int, device: torch.device, combine: str = DEFAULT_COMBINE,
               programs_per_sm: int | None = None) -> int:
    """Key splits per (sequence, KV head): enough programs for every SM, each split >= MIN_SPLIT_KEYS keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv((programs_per_sm or PROGRAMS_PER_SM[combine]) * sms, max(batch * kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(capacity, MIN_SPLIT_KEYS)))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, tail: torch.Tensor,
    *, softmax_scale: float, splits: int | None = None, combine: str = DEFAULT_COMBINE,
    counters: torch.Tensor | None = None, programs_per_sm: int | None = None,
    block_n: int = BLOCK_N, num_stages: int = 3, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``megatron_apbv.apbv.decode.decode_attention``: ``(out [t, b, hq, d], lse [b, hq, t])``.

    ``combine`` picks where the splits are merged (module docstring). ``counters``
    (int32 ``[b * hkv]``, zero) are the in-kernel combine's counters; the kernel
    leaves them zero. Without them a zeroed tensor is allocated per call.
    ``splits`` / ``programs_per_sm`` override :func:`num_splits`; ``block_n`` (keys per tile),
    ``num_stages``, ``num_warps`` the launch (benchmarks sweep them).
    """
    if combine not in COMBINES:
        raise ValueError(f"decode_attention: combine={combine!r}; choose one of {COMBINES}")
    t, b, hq, d = q.shape
    capacity, _, hkv, _ = k_cache.shape
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in the head dimension")
    group = hq // hkv
    if splits is None:
        splits = num_splits(capacity, b, hkv, q.device, combine, programs_per_sm)
    split_len = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    splits = triton.cdiv(capacity, split_len)
    fused = combine == "in_kernel"
    if fused and counters is None:
        counters = torch.zeros(b * hkv, dtype=torch.int32, device=q.device)
    if fused and (counters.dtype != torch.int32 or counters.numel() < b * hkv):
        raise ValueError(f"decode_attention: counters must be int32 with >= {b * hkv} entries")
    outs = torch.empty((splits, t, b, hq, d), dtype=torch.float32, device=q.device)
    lses = torch.empty((splits, b, hq, t), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    d_pad = max(16, triton.next_power_of_2(d))
    block_m = max(16, triton.next_power_of_2(group * t))
    _decode_split_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, lengths, tail, outs, lses, counters if fused else lengths, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        outs.stride(0), outs.stride(1), outs.stride(2), outs.stride(3),
        lses.stride(0), lses.stride(1), lses.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        hkv, split_len, splits, softmax_scale * _LOG2E.value,
        T=t, GROUP=group, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        FUSED_COMBINE=fused, CHUNK_S=max(1, 8192 // (block_m * d_pad)),
        num_warps=num_warps, num_stages=num_stages,
    )
    if fused:
        return out, lse
    block_d = min(32, d_pad)
    _combine_splits_kernel[(t * b * hq, triton.cdiv(d, block_d))](
        outs, lses, out, lse, splits, hq,
        outs.stride(0), outs.stride(1), outs.stride(2), outs.stride(3),
        lses.stride(0), lses.stride(1), lses.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        T=t, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(16, triton.next_power_of_2(splits)), num_warps=4,
    )
    return out, lse


__all__ = ["decode_attention", "num_splits"]
