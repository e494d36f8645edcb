"""The elementwise work of one decode step, fused: residual add + RMSNorm, and QKV bias + RoPE + cache append.

A decode step of a 7B model runs each of these on a few rows of a few thousand
elements: far less work than a kernel launch. Megatron's layer spends 6 to 8
launches per layer on them (norm, adds, bias, rotary halves, concatenation,
the cache scatter); here each is one launch, whose programs read their inputs
once and write their outputs once. Their torch definitions are in
``megatron_apbv/inference/decode_layer.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(R, X, W, Y, n_cols, s_r, s_x, s_y, eps,
                         HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row: the whole row sits in registers (hidden <= 16K)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    r = tl.load(R + row * s_r + cols, mask=ok, other=0.0)
    if HAS_X:
        r = (r.to(tl.float32) + tl.load(X + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)).to(r.dtype)
        tl.store(R + row * s_r + cols, r, mask=ok)
    rf = r.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(rf * rf, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    # rounded as torch's rms_norm: the normalised row in the activations' dtype, then times the weight
    normed = (rf * inv).to(r.dtype).to(tl.float32)
    tl.store(Y + row * s_y + cols, (normed * w).to(Y.dtype.element_ty), mask=ok)


def decode_add_rms_norm(residual: torch.Tensor, delta, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``residual += delta`` in place (if ``delta`` is given); returns ``weight * rms_norm(residual)``.

    ``residual`` / ``delta`` ``[..., hidden]`` with rows of unit stride.
    """
    hidden = residual.shape[-1]
    rows = residual.reshape(-1, hidden)
    if rows.data_ptr() != residual.data_ptr() or rows.stride(-1) != 1:
        raise ValueError(f"decode_add_rms_norm: residual {tuple(residual.shape)} must be contiguous rows")
    x = delta.reshape(-1, hidden) if delta is not None else rows
    if x.stride(-1) != 1 or x.shape != rows.shape:
        raise ValueError(f"decode_add_rms_norm: delta {tuple(delta.shape)} must match residual, unit stride")
    out = torch.empty_like(rows)
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(rows.shape[0],)](
        rows, x, weight, out, hidden, rows.stride(0), x.stride(0), out.stride(0), eps,
        HAS_X=delta is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )
    return out.view(residual.shape)


@triton.jit
def _qkv_rope_append_kernel(QKV, BIAS, COS, SIN, KC, VC, LENS, QO,
                            s_xb, s_cb, s_kn, s_kb, s_kh, s_vn, s_vb, s_vh, s_qb, s_qh,
                            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
                            HAS_BIAS: tl.constexpr):
    # one program per (sequence, head of the fused projection): GROUP query heads, then K, then V per KV group
    b = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1)
    kv = col // (GROUP + 2)
    slot = col % (GROUP + 2)
    half: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, HALF_PAD)
    ok = offs < half
    base = col.to(tl.int64) * HEAD_DIM
    x1 = tl.load(QKV + b * s_xb + base + offs, mask=ok, other=0.0)
    x2 = tl.load(QKV + b * s_xb + base + half + offs, mask=ok, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if HAS_BIAS:  # rounded as the projection's output would be with its bias
        x1 = (x1 + tl.load(BIAS + base + offs, mask=ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (x2 + tl.load(BIAS + base + half + offs, mask=ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    if slot <= GROUP:  # queries and keys rotate; values do not
        c = tl.load(COS + b * s_cb + offs, mask=ok, other=0.0)
        s = tl.load(SIN + b * s_cb + offs, mask=ok, other=0.0)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    else:
        y1 = x1
        y2 = x2
    if slot < GROUP:
        dst = QO + b * s_qb + (kv * GROUP + slot).to(tl.int64) * s_qh
    else:
        pos = tl.load(LENS + b).to(tl.int64)  # the new key's row: this sequence's cached length
        if slot == GROUP:
            dst = KC + pos * s_kn + b * s_kb + kv.to(tl.int64) * s_kh
        else:
            dst = VC + pos * s_vn + b * s_vb + kv.to(tl.int64) * s_vh
    tl.store(dst + offs, y1.to(dtype), mask=ok)
    tl.store(dst + half + offs, y2.to(dtype), mask=ok)


def decode_qkv_rope_append(
    qkv: torch.Tensor, bias, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    lengths: torch.Tensor, *, kv_heads: int,
) -> torch.Tensor:
    """Add the bias to ``qkv`` ``[b, hkv * (g + 2) * d]``, rotate q and k, append k / v to the caches at ``lengths``.

    Returns the rotated queries ``[1, b, hkv * g, d]``. ``cos`` / ``sin`` ``[b, d / 2]`` fp32.
    """
    b, width = qkv.shape
    _, _, hkv, d = k_cache.shape
    group = width // (kv_heads * d) - 2
    if hkv != kv_heads or width != kv_heads * (group + 2) * d or qkv.stride(-1) != 1 or d % 2:
        raise ValueError(f"decode_qkv_rope_append: qkv {tuple(qkv.shape)} does not hold {kv_heads} KV groups of "
                         f"head dim {d} (cache {tuple(k_cache.shape)})")
    if cos.shape != (b, d // 2) or cos.dtype != torch.float32 or sin.shape != cos.shape:
        raise ValueError(f"decode_qkv_rope_append: cos/sin must be fp32 [{b}, {d // 2}], got {tuple(cos.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty((1, b, hkv * group, d), dtype=qkv.dtype, device=qkv.device)
    _qkv_rope_append_kernel[(b, hkv * (group + 2))](
        qkv, bias if bias is not None else qkv, cos, sin, k_cache, v_cache, lengths, q,
        qkv.stride(0), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q.stride(1), q.stride(2),
        GROUP=group, HEAD_DIM=d, HALF_PAD=max(16, triton.next_power_of_2(d // 2)), HAS_BIAS=bias is not None,
        num_warps=1,
    )
    return q


__all__ = ["decode_add_rms_norm", "decode_qkv_rope_append"]
