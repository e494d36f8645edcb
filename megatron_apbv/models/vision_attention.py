"""transformers' Qwen2.5-VL vision tower as a reference: its builder, and its attention batched over segments.

The product runs our tower (:mod:`megatron_apbv.models.vision_tower`); this module
keeps transformers' tower for the tests (equality) and the vision benchmark (the
baseline), with and without :func:`batch_vision_segments`.

Qwen2.5-VL's tower attends inside segments given by ``cu_seqlens``: windows of
at most ``(window_size / patch_size)^2`` patches in most layers, one temporal
group in the full-attention layers. ``transformers`` runs each segment as its own
SDPA call unless flash-attention's varlen kernel is installed; a 64-frame 1440p
video has about 9,600 windows per layer, so the tower then spends its time
launching ~270,000 tiny kernels. :class:`SegmentBatchedVisionAttention` stacks
the segments of a layer on the batch dimension instead (padded to the longest,
padded keys masked; equal-length segments, as in the full-attention layers, need
no padding) and runs one SDPA call. It reuses the original module's ``qkv`` and
``proj`` weights and its rotary helper, so the result is the same attention (CPU
test against the ``transformers`` tower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentBatchedVisionAttention(nn.Module):
    """Drop-in ``block.attn`` of a ``Qwen2_5_VisionTransformerPretrainedModel`` (same weights)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.qkv, self.proj = original.qkv, original.proj
        self.num_heads = original.num_heads
        self.head_dim = original.qkv.in_features // original.num_heads
        self.scaling = self.head_dim ** -0.5

    def forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            apply_rotary_pos_emb_vision,
        )

        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        if position_embeddings is None:  # transformers releases that pass the raw rotary angles
            emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
            position_embeddings = (emb.cos(), emb.sin())
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        out = segment_attention(q, k, v, cu_seqlens, self.scaling)
        return self.proj(out.reshape(n, -1))


def segment_attention(q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
    """Attention of ``[n, h, d]`` tokens inside each ``cu_seqlens`` segment (no mask within a segment)."""
    n, h, d = q.shape
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    starts = [a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if not lengths:
        return q.new_zeros(n, h, d)
    longest = max(lengths)
    if all(length == longest for length in lengths) and starts[0] == 0 and sum(lengths) == n:
        qs, ks, vs = (t.view(len(lengths), longest, h, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        return out.transpose(1, 2).reshape(n, h, d)
    offs = torch.arange(longest, device=q.device)
    start = torch.tensor(starts, device=q.device)[:, None]
    valid = offs[None, :] < torch.tensor(lengths, device=q.device)[:, None]  # [segments, longest]
    index = (start + offs[None, :]).clamp_max(n - 1)
    qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [segments, h, longest, d]
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, None, None, :], scale=scale)
    out = out.transpose(1, 2)[valid]  # the real rows, in segment order = token order
    if out.shape[0] == n:
        return out
    full = q.new_zeros(n, h, d)  # tokens outside every segment (none in the tower) stay zero
    full[index[valid]] = out
    return full


def build_transformers_tower(config=None, *, seed: int = 0, dtype=torch.float32, device=None, **overrides):
    """A randomly initialised ``transformers`` Qwen2.5-VL vision tower (the reference of our tower).

    ``config`` is a ``Qwen2_5_VLVisionConfig``, a dict of its fields, or ``None``
    (the defaults); ``overrides`` update it.
    """
    # Module paths (not the top-level names) exist in every transformers release with Qwen2.5-VL (>= 4.49).
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    if config is None or isinstance(config, dict):
        config = Qwen2_5_VLVisionConfig(**{**(config or {}), **overrides})
    else:
        for k, v in overrides.items():
            setattr(config, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = Qwen2_5_VisionTransformerPretrainedModel(config)
    return tower.to(device=device, dtype=dtype).eval()


def batch_vision_segments(tower: nn.Module) -> nn.Module:
    """Give every block of transformers' ``tower`` a :class:`SegmentBatchedVisionAttention` (in place); returns it.

    Our :class:`~megatron_apbv.models.vision_tower.VisionTower` already attends over
    all segments of a block in one call and is returned unchanged.
    """
    from megatron_apbv.models.vision_tower import VisionTower

    if isinstance(tower, VisionTower):
        return tower
    for block in tower.blocks:
        if not isinstance(block.attn, SegmentBatchedVisionAttention):
            block.attn = SegmentBatchedVisionAttention(block.attn)
    return tower
