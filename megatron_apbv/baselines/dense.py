"""Dense causal core attention: the single-process baseline, same model and inputs as APB-V.

Megatron's own ``DotProductAttention`` allocates its buffers on CUDA, so it cannot
serve as the CPU baseline; this module runs PyTorch's scaled_dot_product_attention on CPUs
and, on GPUs, ``apb_attention`` with no prefix keys: causal attention on the route
``attention_routes`` measured fastest (cuDNN or the Triton kernel), so that the
baseline runs at the same kernel speed as APB-V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_apbv.apbv.core_attention import CoreAttentionBase, RankPlan


class DenseCoreAttention(CoreAttentionBase):
    """Causal attention over the local sequence (``attention_mask`` must be None)."""

    @classmethod
    def rank_plan(cls, cfg, rank: int, world: int) -> RankPlan:
        """Rank 0 holds the whole prompt; the other ranks hold nothing (they wait)."""
        n = cfg.prompt_len
        return RankPlan(torch.arange(n) if rank == 0 else None, None, 0, n - 1)

    @classmethod
    def attention_backend(cls, cfg, rank: int, world: int, dtype: torch.dtype, device: torch.device) -> str:
        """The route of causal attention over the whole prompt (the one call :meth:`forward` makes on CUDA)."""
        from megatron_apbv.apbv.attention_routes import describe_layer
        from megatron_apbv.apbv.layout import SequenceLayout

        whole = SequenceLayout(cfg.prompt_len, 0, 0, 1, zigzag=False).rank(0)
        return describe_layer(whole, cfg.model.head_dim, dtype, device)["block0"]

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("dense baseline attention is causal only: pass attention_mask=None")
        sq, b, hq, d = query.shape
        if query.is_cuda:  # the measured-fastest route for causal attention (attention_routes), as APB-V gets
            from megatron_apbv.apbv.attend import apb_attention

            none = key[:0]
            out, _ = apb_attention(query, none, none, none, none, key, value, anchor_rows=0,
                                   softmax_scale=self.softmax_scale)
            return out.reshape(sq, b, hq * d)
        # SDPA wants [b, h, s, d]; GQA without repeating K/V.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=hq != key.shape[2]
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)
