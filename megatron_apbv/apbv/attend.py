"""Attention of one block over passing, anchor and block keys, with log-sum-exp (docs/design.md §3 steps 4-6).

This is the function boundary the Triton kernel implements for CUDA tensors; on
CUDA each part takes the backend :mod:`megatron_apbv.apbv.attention_routes`
chose by measurement (the Triton kernel, its split-keys form, or two cuDNN calls).
The torch version builds the small APB-V mask explicitly and is meant for CPU
runs and tests, not for long sequences.
"""

from __future__ import annotations

import torch

from megatron_apbv.apbv.attention_routes import (
    CUDNN,
    FEW_QUERY_ROWS,  # noqa: F401  (re-exported: the split-keys threshold)
    KEY_CHUNK,
    TRITON_SPLIT_KEYS,
    route_for,
)
from megatron_apbv.apbv.cudnn_attention import cudnn_block_attention
from megatron_apbv.apbv.kernels_dispatch import kernel_for
from megatron_apbv.apbv.merge import merge_partials


def apb_attention(
    q: torch.Tensor,
    k_pass: torch.Tensor,
    v_pass: torch.Tensor,
    k_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    *,
    anchor_rows: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APB-V masked attention; returns ``(out [sq, b, hq, d], lse [b, hq, sq] fp32)``.

    Tensors are seq-first (Megatron layout); K/V have ``hkv`` heads, query head
    ``h`` reads KV head ``h // (hq // hkv)``. The first ``anchor_rows`` query rows
    are anchor queries: they see the anchor keys causally and nothing else. The
    other rows are block queries: they see every passing key (per KV head, already
    selected), every anchor key, and the block keys causally, bottom-right aligned.
    A row that sees no key gets ``out = 0`` and ``lse = -inf``.
    """
    if anchor_rows and anchor_rows != k_anchor.shape[0]:
        raise ValueError(f"anchor_rows={anchor_rows} must equal the anchor length {k_anchor.shape[0]}")
    kernel = kernel_for("apb_attention", q)
    if kernel is None:
        return _torch_apb_attention(
            q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block, anchor_rows=anchor_rows,
            softmax_scale=softmax_scale,
        )
    route = route_for(q.device, q.dtype, q.shape[-1], rows=q.shape[0], anchor_rows=anchor_rows,
                      n_pass=k_pass.shape[0], n_anchor=k_anchor.shape[0], n_block=k_block.shape[0])
    if route.block_rows == TRITON_SPLIT_KEYS:
        return attend_split_keys(
            kernel, q, torch.cat([k_pass, k_anchor]), torch.cat([v_pass, v_anchor]), k_block, v_block,
            softmax_scale=softmax_scale, chunk=KEY_CHUNK,
        )
    if route.block_rows == CUDNN:
        return cudnn_block_attention(
            kernel, q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block, anchor_rows=anchor_rows,
            softmax_scale=softmax_scale,
        )
    return kernel(
        q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block, anchor_rows=anchor_rows, softmax_scale=softmax_scale
    )


def attend_split_keys(
    attend, q, k_visible, v_visible, k_block, v_block, *, softmax_scale: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apb_attention`` of block rows (no anchor rows) with the fully visible keys split into chunks.

    ``attend`` is an implementation of :func:`apb_attention`. Whole chunks of
    ``k_visible`` run as one call with the chunks stacked on the batch dimension;
    the remainder and the causal ``k_block`` run as a second call; the partials
    are merged by log-sum-exp. Same result as one call over all keys.
    """
    sq, b, hq, d = q.shape
    n, _, hkv, _ = k_visible.shape
    splits = n // chunk
    whole = splits * chunk
    empty = k_visible[:0]

    def stacked(t):  # [splits * chunk, b, h, d] -> [chunk, splits * b, h, d]
        return t[:whole].view(splits, chunk, b, hkv, d).transpose(0, 1).reshape(chunk, splits * b, hkv, d)

    q_stacked = q.unsqueeze(1).expand(sq, splits, b, hq, d).reshape(sq, splits * b, hq, d)
    none = k_visible.new_empty((0, splits * b, hkv, d))
    out, lse = attend(
        q_stacked, stacked(k_visible), stacked(v_visible), none, none, none, none, anchor_rows=0,
        softmax_scale=softmax_scale,
    )
    rest_out, rest_lse = attend(
        q, k_visible[whole:], v_visible[whole:], empty, empty, k_block, v_block, anchor_rows=0,
        softmax_scale=softmax_scale,
    )
    outs = torch.cat([out.view(sq, splits, b, hq, d).permute(1, 0, 2, 3, 4), rest_out.unsqueeze(0)])
    lses = torch.cat([lse.view(splits, b, hq, sq), rest_lse.unsqueeze(0)])
    return merge_partials(outs, lses)


def _torch_apb_attention(q, k_pass, v_pass, k_anchor, v_anchor, k_block, v_block, *, anchor_rows, softmax_scale):
    mask = apb_mask(anchor_rows, q.shape[0] - anchor_rows, k_pass.shape[0], k_anchor.shape[0], k_block.shape[0])
    k = torch.cat([k_pass, k_anchor, k_block])
    v = torch.cat([v_pass, v_anchor, v_block])
    return masked_attention(q, k, v, mask.to(q.device), softmax_scale=softmax_scale)


def apb_mask(anchor_rows: int, block_rows: int, n_pass: int, n_anchor: int, n_block: int) -> torch.Tensor:
    """Boolean ``[rows, keys]`` mask over keys ``[passing | anchor | block]``."""
    rows = anchor_rows + block_rows
    mask = torch.zeros(rows, n_pass + n_anchor + n_block, dtype=torch.bool)
    anchor_keys = slice(n_pass, n_pass + n_anchor)
    mask[:anchor_rows, anchor_keys] = torch.ones(anchor_rows, n_anchor, dtype=torch.bool).tril()
    mask[anchor_rows:, : n_pass + n_anchor] = True
    # Causal inside the block, aligned to the bottom-right corner (row i sees key i + n_block - block_rows).
    offset = n_block - block_rows
    mask[anchor_rows:, n_pass + n_anchor :] = torch.ones(block_rows, n_block, dtype=torch.bool).tril(offset)
    return mask


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an explicit ``[sq, sk]`` boolean mask, GQA, fp32 math; returns ``(out, lse)``."""
    sq, b, hq, d = q.shape
    hkv = k.shape[2]
    qf = q.float().view(sq, b, hkv, hq // hkv, d)
    scores = torch.einsum("sbhgd,tbhd->bhgst", qf, k.float()) * softmax_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows without any visible key: exp(-inf - (-inf)) would be NaN; give them zero weight.
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    out = torch.einsum("bhgst,tbhd->sbhgd", probs, v.float())
    return out.reshape(sq, b, hq, d).to(q.dtype), lse.reshape(b, hq, sq)
