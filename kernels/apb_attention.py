"""Fused APB-V block attention (forward), one Triton kernel.

Queries ``[A | B]`` (``anchor_rows`` anchor rows, then block rows) attend to
three key segments that live in separate tensors (nothing is concatenated):

* passing keys  ``P`` (per KV head selected tokens): block rows see all of them;
* anchor keys   ``A``: anchor row ``i`` sees ``A[0..i]``, block rows see all;
* block keys    ``B``: block row ``i`` sees ``B[0..i + Lk - Lq]`` (bottom-right causal).

Layout is Megatron's ``[seq, batch, heads, dim]``; any strides. GQA is done by
indexing (query head ``h`` reads KV head ``h // g``), never by repeating K/V.

Per (query tile, head) program the key range of each segment is split into
tiles that every row of the tile sees (no mask work) and boundary tiles
(masked); tiles nobody in the query tile sees are never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(
    X, col, start_n, s_n, s_d, seg_len, offs_n0, offs_d, d_ok,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
):
    # One [BLOCK_N, D] tile of keys or values from key row start_n: the same load for K and V.
    # TMA: X is a 2-D [seq, cols] descriptor (rows past the end read as 0). Pointers: X points at row
    # start_n already; rows past seg_len (MASKED tiles only) and the head-dim padding read as 0.
    if USE_TMA:
        x = X.load([start_n, col])
    else:
        xp = X + offs_n0[:, None] * s_n + offs_d[None, :] * s_d
        if MASKED:
            n_ok = start_n + offs_n0 < seg_len
            if EVEN_D:
                x = tl.load(xp, mask=n_ok[:, None], other=0.0)
            else:
                x = tl.load(xp, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                x = tl.load(xp)
            else:
                x = tl.load(xp, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _attn_step(
    acc, l_i, m_i, q,
    K, V, k_col, v_col, start_n, s_kn, s_kd, s_vn, s_vd, seg_len,
    offs_m, offs_n0, offs_d, d_ok,
    anchor_rows, diag, qk_scale,
    SEG: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    # pointer path: K, V point at key row start_n already (64-bit scalar pointers)
    # TMA path: K, V are 2-D [seq, cols] descriptors; rows past the end read as 0
    offs_n = start_n + offs_n0
    k = _load_tile(K, k_col, start_n, s_kn, s_kd, seg_len, offs_n0, offs_d, d_ok, MASKED, EVEN_D, USE_TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        r = offs_m[:, None]
        j = offs_n[None, :]
        vis = j < seg_len
        if SEG == 0:
            vis = vis & (r >= anchor_rows)
        elif SEG == 1:
            vis = vis & ((j <= r) | (r >= anchor_rows))
        else:
            vis = vis & (r >= anchor_rows) & (j <= r - anchor_rows + diag)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows that have seen nothing yet keep m = -inf; shift by 0 instead
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_tile(V, v_col, start_n, s_vn, s_vd, seg_len, offs_n0, offs_d, d_ok, MASKED, EVEN_D, USE_TMA)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_segment(
    acc, l_i, m_i, q,
    K, V, k_col, v_col, s_kn, s_kd, s_vn, s_vd, seg_len, hi_full, hi,
    offs_m, offs_n0, offs_d, d_ok,
    anchor_rows, diag, qk_scale,
    SEG: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    # scalar key-row pointers carried through the loops (no 32-bit overflow)
    k_cur = K
    v_cur = V
    for start_n in range(0, hi_full, BLOCK_N):
        acc, l_i, m_i = _attn_step(
            acc, l_i, m_i, q, k_cur, v_cur, k_col, v_col, start_n, s_kn, s_kd, s_vn, s_vd,
            seg_len, offs_m, offs_n0, offs_d, d_ok, anchor_rows, diag, qk_scale,
            SEG, False, EVEN_D, DOT_PREC, USE_TMA)
        if not USE_TMA:
            k_cur += BLOCK_N * s_kn
            v_cur += BLOCK_N * s_vn
    for start_n in range(hi_full, hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(
            acc, l_i, m_i, q, k_cur, v_cur, k_col, v_col, start_n, s_kn, s_kd, s_vn, s_vd,
            seg_len, offs_m, offs_n0, offs_d, d_ok, anchor_rows, diag, qk_scale,
            SEG, True, EVEN_D, DOT_PREC, USE_TMA)
        if not USE_TMA:
            k_cur += BLOCK_N * s_kn
            v_cur += BLOCK_N * s_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["sq", "anchor_rows", "n_pass", "n_anchor", "n_block", "diag"])
def _apb_attn_fwd(
    Q, KP, VP, KA, VA, KB, VB, O, LSE,
    sq, anchor_rows, n_pass, n_anchor, n_block, diag, qk_scale,
    n_heads, group,
    s_qs, s_qb, s_qh, s_qd,
    s_kps, s_kpb, s_kph, s_kpd,
    s_vps, s_vpb, s_vph, s_vpd,
    s_kas, s_kab, s_kah, s_kad,
    s_vas, s_vab, s_vah, s_vad,
    s_kbs, s_kbb, s_kbh, s_kbd,
    s_vbs, s_vbb, s_vbh, s_vbd,
    s_os, s_ob, s_oh, s_od,
    s_lb, s_lh, s_ls,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    # heaviest (last) query tiles first: better tail balance for causal work
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)

    m0 = tile * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < sq

    qp = Q + b64 * s_qb + h64 * s_qh + offs_m[:, None].to(tl.int64) * s_qs + offs_d[None, :] * s_qd
    q = tl.load(qp, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    # --- which key tiles this query tile needs (scalars) ---
    m1 = tl.minimum(m0 + BLOCK_M, sq)
    has_a = m0 < anchor_rows          # tile holds anchor rows
    has_b = m1 > anchor_rows          # tile holds block rows
    # passing keys: block rows only
    p_hi = tl.where(has_b, n_pass, 0)
    p_full = tl.where(has_a, 0, (n_pass // BLOCK_N) * BLOCK_N)
    p_full = tl.minimum(p_full, p_hi)
    # anchor keys: anchor rows causal, block rows all
    a_hi = tl.where(has_b, n_anchor, tl.minimum(n_anchor, m1))
    a_full = (n_anchor // BLOCK_N) * BLOCK_N
    a_full = tl.where(has_a, tl.minimum(a_full, ((m0 + 1) // BLOCK_N) * BLOCK_N), a_full)
    a_full = tl.minimum(a_full, a_hi)
    # block keys: block rows, bottom-right causal
    b_hi = tl.where(has_b, tl.minimum(tl.maximum(m1 - anchor_rows + diag, 0), n_block), 0)
    b_full = (tl.maximum(m0 - anchor_rows + diag + 1, 0) // BLOCK_N) * BLOCK_N
    b_full = tl.minimum(b_full, (n_block // BLOCK_N) * BLOCK_N)
    b_full = tl.where(has_a, 0, b_full)
    b_full = tl.minimum(b_full, b_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    if USE_TMA:
        # descriptors over [seq, cols]; this (batch, kv head) starts at column b*s_b + hk*s_h
        kp_base = KP
        vp_base = VP
        ka_base = KA
        va_base = VA
        kb_base = KB
        vb_base = VB
        kp_col = b * s_kpb + hk * s_kph
        vp_col = b * s_vpb + hk * s_vph
        ka_col = b * s_kab + hk * s_kah
        va_col = b * s_vab + hk * s_vah
        kb_col = b * s_kbb + hk * s_kbh
        vb_col = b * s_vbb + hk * s_vbh
    else:
        kp_base = KP + b64 * s_kpb + hk64 * s_kph
        vp_base = VP + b64 * s_vpb + hk64 * s_vph
        ka_base = KA + b64 * s_kab + hk64 * s_kah
        va_base = VA + b64 * s_vab + hk64 * s_vah
        kb_base = KB + b64 * s_kbb + hk64 * s_kbh
        vb_base = VB + b64 * s_vbb + hk64 * s_vbh
        kp_col = 0
        vp_col = 0
        ka_col = 0
        va_col = 0
        kb_col = 0
        vb_col = 0

    acc, l_i, m_i = _attn_segment(
        acc, l_i, m_i, q, kp_base, vp_base, kp_col, vp_col,
        s_kps, s_kpd, s_vps, s_vpd, n_pass, p_full, p_hi,
        offs_m, offs_n0, offs_d, d_ok, anchor_rows, diag, qk_scale,
        0, BLOCK_N, EVEN_D, DOT_PREC, USE_TMA)
    acc, l_i, m_i = _attn_segment(
        acc, l_i, m_i, q, ka_base, va_base, ka_col, va_col,
        s_kas, s_kad, s_vas, s_vad, n_anchor, a_full, a_hi,
        offs_m, offs_n0, offs_d, d_ok, anchor_rows, diag, qk_scale,
        1, BLOCK_N, EVEN_D, DOT_PREC, USE_TMA)
    acc, l_i, m_i = _attn_segment(
        acc, l_i, m_i, q, kb_base, vb_base, kb_col, vb_col,
        s_kbs, s_kbd, s_vbs, s_vbd, n_block, b_full, b_hi,
        offs_m, offs_n0, offs_d, d_ok, anchor_rows, diag, qk_scale,
        2, BLOCK_N, EVEN_D, DOT_PREC, USE_TMA)

    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    out = acc / l_div[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_div)) * 0.6931471805599453)

    op = O + b64 * s_ob + h64 * s_oh + offs_m[:, None].to(tl.int64) * s_os + offs_d[None, :] * s_od
    tl.store(op, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lp = LSE + b64 * s_lb + h64 * s_lh + offs_m.to(tl.int64) * s_ls
    tl.store(lp, lse, mask=m_ok)


def default_config(device: torch.device, head_dim: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) used when none is given."""
    if device.type != "cuda":  # Triton interpreter: small tiles, fast on CPU
        return (16, 16, 4, 1)
    if dtype == torch.float32:
        return (64, 32, 4, 2)
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:  # Hopper; d=128 picked by the sweep of benchmarks/bench_kernels.py (NOTES.md)
        # (128, 128, 8, 3) with d=128 uses 225 KiB of shared memory: fits Hopper's 227 KiB
        return (128, 64, 8, 3) if head_dim <= 64 else (128, 128, 8, 3)
    return (64, 64, 4, 2)


def _tma_ok(q, segs, d, d_pad) -> bool:
    """Hopper bulk-tensor loads need 16-byte aligned bases and row strides."""
    if q.device.type != "cuda" or TensorDescriptor is None:
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or d != d_pad or d > 256:
        return False
    es = q.element_size()
    for t in segs:
        if t.stride(3) != 1 or (t.stride(0) * es) % 16 or t.data_ptr() % 16:
            return False
    return True


def _descriptor(t, block_n, d):
    """2-D view [seq, cols] of a [seq, b, h, d] tensor (unit stride on d)."""
    s, b, h, _ = t.shape
    cols = (b - 1) * t.stride(1) + (h - 1) * t.stride(2) + d
    return TensorDescriptor(t, [s, cols], [t.stride(0), 1], [block_n, d])


def _check_kv(name, k, v, b, hkv, d):
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: K and V must be [seq, batch, kv_heads, dim]")
    if k.shape != v.shape:
        raise ValueError(f"{name}: K {tuple(k.shape)} and V {tuple(v.shape)} differ")
    if k.shape[1] != b or k.shape[2] != hkv or k.shape[3] != d:
        raise ValueError(f"{name}: shape {tuple(k.shape)} does not match batch={b}, kv_heads={hkv}, dim={d}")


def apb_attention_impl(q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block, *,
                       anchor_rows: int, softmax_scale: float, config=None,
                       out=None, lse=None):
    """:func:`apb_attention` with an explicit tile config and optional output buffers."""
    if q.dim() != 4:
        raise ValueError("q must be [seq, batch, heads, dim]")
    sq, b, hq, d = q.shape
    hkv = k_block.shape[2]
    for name, k, v in (("passing", k_pass, v_pass), ("anchor", k_anchor, v_anchor),
                       ("block", k_block, v_block)):
        _check_kv(name, k, v, b, hkv, d)
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    n_pass, n_anchor, n_block = k_pass.shape[0], k_anchor.shape[0], k_block.shape[0]
    anchor_rows = int(anchor_rows)
    if anchor_rows < 0 or anchor_rows > sq:
        raise ValueError(f"anchor_rows={anchor_rows} outside [0, {sq}]")
    if anchor_rows > 0 and anchor_rows != n_anchor:
        raise ValueError(f"anchor_rows={anchor_rows} must equal the anchor length {n_anchor}")
    n_q_block = sq - anchor_rows
    for t in (k_pass, v_pass, k_anchor, v_anchor, k_block, v_block):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError("q, K and V must share dtype and device")

    if out is None:
        out = torch.empty((sq, b, hq, d), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if sq == 0 or b == 0 or hq == 0:
        return out, lse

    # empty segments never get loaded; give the kernel a valid pointer anyway
    def _nz(t):
        return t if t.shape[0] > 0 else q

    kp, vp = _nz(k_pass), _nz(v_pass)
    ka, va = _nz(k_anchor), _nz(v_anchor)
    kb, vb = _nz(k_block), _nz(v_block)

    if config is None:
        config = default_config(q.device, d, q.dtype)
    block_m, block_n, num_warps, num_stages = config[:4]
    want_tma = config[4] if len(config) > 4 else True
    d_pad = max(16, triton.next_power_of_2(d))
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    segs = [kp, vp, ka, va, kb, vb]
    use_tma = bool(want_tma) and _tma_ok(q, segs, d, d_pad)
    if use_tma:
        args = [_descriptor(t, block_n, d) for t in segs]
    else:
        args = segs
    grid = (triton.cdiv(sq, block_m), b * hq)
    _apb_attn_fwd[grid](
        q, *args, out, lse,
        sq, anchor_rows, n_pass, n_anchor, n_block, n_block - n_q_block,
        float(softmax_scale) * _LOG2E,
        hq, hq // hkv,
        *q.stride(), *kp.stride(), *vp.stride(), *ka.stride(), *va.stride(),
        *kb.stride(), *vb.stride(), *out.stride(), *lse.stride(),
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC=dot_prec,
        USE_TMA=use_tma, num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def apb_attention(q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block, *,
                  anchor_rows: int, softmax_scale: float, out=None, lse=None):
    """APB-V attention of ``[A | B]`` queries over ``[P | A | B]`` keys.

    Args:
        q: ``[sq, b, hq, d]``; the first ``anchor_rows`` rows are anchor queries.
        k_pass, v_pass: ``[n_pass, b, hkv, d]`` passing keys/values (per KV head).
        k_anchor, v_anchor: ``[a, b, hkv, d]``; ``anchor_rows`` is 0 or ``a``.
        k_block, v_block: ``[Lk, b, hkv, d]``.
        softmax_scale: multiplier of ``q . k`` before the softmax.
        out, lse: optional buffers (any strides) that receive the result.

    Returns:
        ``(out, lse)``: ``out`` ``[sq, b, hq, d]`` in q's dtype, ``lse``
        ``[b, hq, sq]`` float32 natural-log log-sum-exp of the scaled scores.
        Rows that see no key get ``out = 0`` and ``lse = -inf``.
    """
    return apb_attention_impl(q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block,
                              anchor_rows=anchor_rows, softmax_scale=softmax_scale, out=out, lse=lse)


def visible_pairs(sq: int, anchor_rows: int, n_pass: int, n_anchor: int, n_block: int) -> int:
    """Number of (query, key) pairs the APB-V mask lets through (per head)."""
    lq = sq - anchor_rows
    total = anchor_rows * (anchor_rows + 1) // 2 + lq * (n_pass + n_anchor)
    diag = n_block - lq
    # block row i sees clamp(i + diag + 1, 0, n_block) block keys
    rows = torch.arange(lq, dtype=torch.int64)
    total += int((rows + diag + 1).clamp(0, n_block).sum())
    return total


__all__ = ["apb_attention", "apb_attention_impl", "default_config", "visible_pairs"]
