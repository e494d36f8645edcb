"""The cuDNN route of APB-V's block attention (chosen in :mod:`megatron_apbv.apbv.attention_routes`).

Block rows see the block's own keys causally and every ``[passing | anchor]``
key. With as many block keys as rows, those are two masks cuDNN's fused
attention has: ``is_causal`` over the block and no mask over the prefix. Two
calls return each partial with its log-sum-exp; the LSE merge makes them the
exact attention over all three segments. Anchor rows (first block only) keep
the Triton kernel.

The op is ``torch.ops.aten._scaled_dot_product_cudnn_attention`` (PyTorch's
cuDNN backend of SDPA, called directly because SDPA itself drops the
log-sum-exp). Schema (torch 2.11 and 2.13)::

    (Tensor query, Tensor key, Tensor value, Tensor? attn_bias, bool compute_log_sumexp,
     float dropout_p=0., bool is_causal=False, bool return_debug_mask=False, *, float? scale=None)
    -> (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug_attn_mask)

with ``[b, h, s, d]`` tensors (strided views of Megatron's ``[s, b, h, d]``
work) and ``logsumexp`` the natural-log LSE of the scaled scores, shaped
``[b, h, s, 1]`` (measured on the H200: torch 2.11, cuDNN 9.19, error 1e-6 against
a float32 reference). There it also takes fewer K/V heads than query heads
(GQA) with the same result as expanded K/V, so K/V are expanded only where the
route table does not record that (``attention_routes.cudnn_native_gqa``).
"""

from __future__ import annotations

import torch

from megatron_apbv.apbv.attention_routes import cudnn_native_gqa
from megatron_apbv.apbv.merge import merge_pair


def cudnn_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, softmax_scale: float, native_gqa: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention of seq-first ``q [s, b, hq, d]`` over ``k``/``v [t, b, hkv, d]``; ``(out, lse [b, hq, s])``.

    ``causal`` is top-left aligned (row ``i`` sees keys ``0..i``), so callers pass
    ``t == s`` for the causal mask. ``native_gqa``: the op takes ``hkv < hq``
    itself (measured, ``attention_routes``); else K/V are expanded to ``hq`` heads.
    ``out`` is a ``[s, b, hq, d]`` view of the op's ``[b, hq, s, d]`` result.
    """
    sq, b, hq, _ = q.shape
    hkv = k.shape[2]
    if hkv != hq and not native_gqa:
        k = k.repeat_interleave(hq // hkv, dim=2)
        v = v.repeat_interleave(hq // hkv, dim=2)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), None, True, 0.0, causal, False,
        scale=softmax_scale,
    )[:2]
    return out.permute(2, 0, 1, 3), lse.reshape(b, hq, sq).float()  # lse comes as [b, hq, s, 1]


def cudnn_block_attention(
    kernel, q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block, *, anchor_rows: int, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~megatron_apbv.apbv.attend.apb_attention`, block rows on cuDNN (``len(k_block)`` must equal them).

    ``kernel`` is the Triton ``apb_attention`` (with ``out`` / ``lse`` buffers); it
    runs the anchor rows straight into the result's first rows, and the merge of
    the two cuDNN partials writes the other rows: no copy of the partials.
    """
    block_q = q[anchor_rows:]
    if k_block.shape[0] != block_q.shape[0]:
        raise ValueError(f"the cuDNN route needs as many block keys ({k_block.shape[0]}) as block rows "
                         f"({block_q.shape[0]})")
    native = cudnn_native_gqa(q.device, q.shape[-1])
    causal_out, causal_lse = cudnn_attention(block_q, k_block, v_block, causal=True, softmax_scale=softmax_scale,
                                             native_gqa=native)
    n_prefix = k_pass.shape[0] + k_anchor.shape[0]
    if not n_prefix:  # anchor rows need anchor keys, so there are none here either
        return causal_out, causal_lse
    prefix_out, prefix_lse = cudnn_attention(
        block_q, torch.cat([k_pass, k_anchor]), torch.cat([v_pass, v_anchor]), causal=False,
        softmax_scale=softmax_scale, native_gqa=native,
    )
    sq, b, hq, d = q.shape
    out = torch.empty((sq, b, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    merge_pair(causal_out, causal_lse, prefix_out, prefix_lse, out=out[anchor_rows:], lse=lse[:, :, anchor_rows:])
    if anchor_rows:
        empty = k_anchor[:0]
        kernel(q[:anchor_rows], empty, empty, k_anchor, v_anchor, empty, empty, anchor_rows=anchor_rows,
               softmax_scale=softmax_scale, out=out[:anchor_rows], lse=lse[:, :, :anchor_rows])
    return out, lse
