"""The elementwise chains of our Qwen2.5-VL vision tower, one Triton kernel each (CUDA tensors).

``megatron_apbv/models/vision_tower.py`` defines each operation in torch (the CPU
path and the reference); these kernels compute the same function with one read
and one write of each tensor, rounding where transformers' tower rounds (so bf16
results agree to the last bit in most elements):

* :func:`vision_bias_rms_norm`: ``h += bias`` (in place, optional), then
  ``weight * rms_normalise(h)``: the residual's pending bias and the next norm;
* :func:`vision_rope_qk_`: 2-D rotary embedding of q and k inside the fused
  ``[N, 3, heads, head_dim]`` qkv output, in place;
* :func:`vision_silu_mul`: ``silu(gate) * up`` of the fused ``[N, 2 * I]``
  gate/up output.

Lengths are run-time arguments: a new video shape never compiles a new kernel
(Triton specialises integers only on divisibility by 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["vision_bias_rms_norm", "vision_rope_qk_", "vision_silu_mul"]


@triton.jit
def _bias_rms_norm_kernel(H, B, W, Y, n_rows, n_cols, s_h, s_y, eps,
                          HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < n_cols
    ok = (rows < n_rows)[:, None] & c_ok[None, :]
    r = rows.to(tl.int64)[:, None]
    h_ptr = H + r * s_h + cols[None, :]
    h = tl.load(h_ptr, mask=ok, other=0.0)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=c_ok, other=0.0)
        h = (h.to(tl.float32) + b.to(tl.float32)[None, :]).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr, h, mask=ok)
    x = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = (x * inv[:, None]).to(h_ptr.dtype.element_ty).to(tl.float32)  # rounded like transformers
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(Y + r * s_y + cols[None, :], (w[None, :] * normed).to(Y.dtype.element_ty), mask=ok)


def vision_bias_rms_norm(h: torch.Tensor, bias, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += bias`` in place (when ``bias`` is given), returns ``weight * rms_norm(h)`` (``[N, C]``)."""
    n, c = h.shape
    if h.stride(1) != 1:
        raise ValueError("vision_bias_rms_norm needs rows with unit column stride")
    y = torch.empty((n, c), dtype=h.dtype, device=h.device)
    if n == 0:
        return y
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(16, 4096 // block_c))
    grid = (triton.cdiv(n, block_r),)
    _bias_rms_norm_kernel[grid](
        h, bias if bias is not None else weight, weight, y, n, c, h.stride(0), y.stride(0), float(eps),
        HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_c >= 2048 else 4,
    )
    return y


@triton.jit
def _rope_qk_kernel(QKV, COS, SIN, n_rows, n_heads, s_row, s_part, s_head, s_cos,
                    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_J)  # (head, frequency) pairs of one row
    head = j // HALF
    f = j % HALF
    ok = (rows < n_rows)[:, None] & (j < n_heads * HALF)[None, :]
    r = rows.to(tl.int64)[:, None]
    c = tl.load(COS + r * s_cos + f[None, :], mask=ok, other=0.0)
    s = tl.load(SIN + r * s_cos + f[None, :], mask=ok, other=0.0)
    base = QKV + r * s_row + (head * s_head + f)[None, :]
    for part in tl.static_range(2):  # q, then k
        ptr = base + part * s_part
        x1 = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptr, (x1 * c - x2 * s).to(ptr.dtype.element_ty), mask=ok)
        tl.store(ptr + HALF, (x2 * c + x1 * s).to(ptr.dtype.element_ty), mask=ok)


def vision_rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q and k of ``qkv [N, 3, heads, D]`` in place by fp32 ``cos``/``sin [N, D/2]``; returns ``qkv``."""
    n, three, heads, d = qkv.shape
    if three != 3 or d % 2 or qkv.stride(3) != 1 or cos.shape != (n, d // 2) or sin.stride() != cos.stride():
        raise ValueError(f"vision_rope_qk_: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}")
    if n == 0:
        return qkv
    half = d // 2
    block_j = triton.next_power_of_2(heads * half)
    block_r = max(1, min(16, 4096 // block_j))
    grid = (triton.cdiv(n, block_r),)
    _rope_qk_kernel[grid](
        qkv, cos, sin, n, heads, qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0),
        HALF=half, BLOCK_R=block_r, BLOCK_J=block_j, num_warps=8,
    )
    return qkv


@triton.jit
def _silu_mul_kernel(GU, OUT, n_rows, n_cols, s_gu, s_out,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r = rows.to(tl.int64)[:, None]
    g_ptr = GU + r * s_gu + cols[None, :]
    g = tl.load(g_ptr, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(g_ptr + n_cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(g_ptr.dtype.element_ty).to(tl.float32)  # silu rounded, as torch
    tl.store(OUT + r * s_out + cols[None, :], (act * u).to(OUT.dtype.element_ty), mask=ok)


def vision_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]`` for ``gate_up [N, 2 * I]`` -> ``[N, I]``."""
    n, two_i = gate_up.shape
    if two_i % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"vision_silu_mul: gate_up {tuple(gate_up.shape)} must be [N, 2 * I] with unit stride")
    i = two_i // 2
    out = torch.empty((n, i), dtype=gate_up.dtype, device=gate_up.device)
    if n == 0:
        return out
    block_r, block_c = 16, 128
    grid = (triton.cdiv(n, block_r), triton.cdiv(i, block_c))
    _silu_mul_kernel[grid](gate_up, out, n, i, gate_up.stride(0), out.stride(0),
                           BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out
