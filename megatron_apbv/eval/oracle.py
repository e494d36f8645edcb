"""Single-process APB-V / Star attention from the reference oracle's explicit mask (batched, any device).

Used for a quick cross-check of a trained model without launching ranks (e.g. on one
GPU right after training). ``apbv eval`` itself runs the real distributed code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apbv.apbv.reference import apbv_mask_reference
from megatron_apbv.apbv.spec import get_gpt_layer_spec_with


class MaskedOracleAttention(MegatronModule):
    """Core attention under the APB-V mask of the reference oracle; settings in ``self.settings``.

    ``settings`` is a dict ``mode, world_size, anchor_len, query_len, passing_len, zigzag, window``
    and optionally the selection-rule keywords of the oracle (``selection, frame_start, frame_len,
    recent_fraction``), shared by every layer (set it before a forward); ``mode=None`` means dense
    causal attention.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, settings=None):
        super().__init__(config=config)
        self.settings = settings if settings is not None else {}
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def example_mask(self, index: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """The oracle's ``[hkv, s, s]`` mask of batch element ``index`` (``[s, h, d]`` inputs); None = dense."""
        if self.settings.get("mode") is None:
            return None
        opts = {k_: v_ for k_, v_ in self.settings.items() if k_ != "mode"}
        return apbv_mask_reference(query.float(), key.float(), softmax_scale=self.softmax_scale, **opts)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, hq, d = query.shape
        hkv = key.shape[2]
        causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()[None, None]
        outs = []
        for i in range(b):
            q, k, v = (t[:, i].transpose(0, 1)[None] for t in (query, key, value))  # [1, h, s, d]
            m = self.example_mask(i, query[:, i], key[:, i])
            mask = causal if m is None else m.to(query.device).repeat_interleave(hq // hkv, dim=0)[None]
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
            o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               scale=self.softmax_scale)
            outs.append(o[0].transpose(0, 1).reshape(s, hq * d).to(query.dtype))
        return torch.stack(outs, dim=1)


def oracle_spec(settings: dict) -> ModuleSpec:
    return get_gpt_layer_spec_with(ModuleSpec(module=MaskedOracleAttention, params={"settings": settings}))
