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
work) and ``logsumexp`` the natural-log LSE of the scaled scores per
``[b, h, s]`` (GPU tests compare it with a float64 reference). Equal head
counts are required, so K/V are expanded to the query heads (a copy: about 1 %
of the attention time at 32K block rows).
"""

from __future__ import annotations

import torch

from megatron_apbv.apbv.merge import merge_partials


def cudnn_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention of seq-first ``q [s, b, hq, d]`` over ``k``/``v [t, b, hkv, d]``; ``(out, lse [b, hq, s])``.

    ``causal`` is top-left aligned (row ``i`` sees keys ``0..i``), so callers pass
    ``t == s`` for the causal mask.
    """
    sq, b, hq, _ = q.shape
    hkv = k.shape[2]
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=2)
        v = v.repeat_interleave(hq // hkv, dim=2)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), None, True, 0.0, causal, False,
        scale=softmax_scale,
    )[:2]
    return out.permute(2, 0, 1, 3), lse.reshape(b, hq, sq).float()


def cudnn_block_attention(
    kernel, q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block, *, anchor_rows: int, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~megatron_apbv.apbv.attend.apb_attention` with the block rows on cuDNN (needs ``len(k_block)`` block rows).

    ``kernel`` is the Triton ``apb_attention``; it runs the anchor rows.
    """
    block_q = q[anchor_rows:]
    if k_block.shape[0] != block_q.shape[0]:
        raise ValueError(f"the cuDNN route needs as many block keys ({k_block.shape[0]}) as block rows "
                         f"({block_q.shape[0]})")
    out, lse = cudnn_attention(block_q, k_block, v_block, causal=True, softmax_scale=softmax_scale)
    if k_pass.shape[0] + k_anchor.shape[0]:
        prefix_out, prefix_lse = cudnn_attention(
            block_q, torch.cat([k_pass, k_anchor]), torch.cat([v_pass, v_anchor]), causal=False,
            softmax_scale=softmax_scale,
        )
        out, lse = merge_partials(torch.stack([out, prefix_out]), torch.stack([lse, prefix_lse]))
    if not anchor_rows:
        return out.contiguous(), lse
    empty = k_anchor[:0]
    anchor_out, anchor_lse = kernel(q[:anchor_rows], empty, empty, k_anchor, v_anchor, empty, empty,
                                    anchor_rows=anchor_rows, softmax_scale=softmax_scale)
    return torch.cat([anchor_out, out]), torch.cat([anchor_lse, lse], dim=-1)
