"""Single-process APB-V / Star attention from the reference oracle's selections (batched, any device).

Used for a quick cross-check of a trained model without launching ranks (e.g. on one
GPU right after training) and for the real-model quality benchmark at large n
(benchmarks/quality_real.py). The passed keys are the reference's
(:func:`~megatron_apbv.apbv.reference.apbv_passing_selection_reference`); each KV head's
rows then attend only to the keys :func:`~megatron_apbv.apbv.reference.apbv_mask_reference`
shows them, one virtual block at a time, instead of running full attention under an
``[heads, N, N]`` mask (at 4K tokens that was about 44 s a forward on 2 CPU cores).
``apbv eval`` itself runs the real distributed code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apbv.apbv.reference import (
    apbv_block_bounds_reference,
    apbv_mask_reference,
    apbv_passing_selection_reference,
)
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
        # A subclass that looks at the explicit mask (example_mask) gets attention under that mask;
        # otherwise each KV head attends to its visible keys only (same numbers, far less work).
        masked = type(self).example_mask is not MaskedOracleAttention.example_mask
        outs = []
        for i in range(b):
            q, k, v = query[:, i].float(), key[:, i].float(), value[:, i].float()  # [s, h, d]
            o = self._masked(i, q, k, v) if masked else self._visible(q, k, v)
            outs.append(o.reshape(s, hq * d).to(query.dtype))
        return torch.stack(outs, dim=1)

    def _masked(self, index, q, k, v) -> torch.Tensor:
        """``[s, hq, d]``: SDPA of every query head under its KV head's ``[s, s]`` mask."""
        s, hq, _ = q.shape
        group = hq // k.shape[1]
        m = self.example_mask(index, q, k)
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()[None] if m is None else \
            m.to(q.device).repeat_interleave(group, dim=0)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(group, dim=1).transpose(0, 1),
                                           v.repeat_interleave(group, dim=1).transpose(0, 1), attn_mask=mask,
                                           scale=self.softmax_scale)
        return o.transpose(0, 1)

    def _visible(self, q, k, v) -> torch.Tensor:
        """``[s, hq, d]``: the oracle's attention, each row attending only to the keys its mask shows.

        Rows of the anchor and of the query span are causal over the prompt; rows of virtual block
        ``B_j`` see, per KV head, the anchor, the keys the reference selected in ``B_0 .. B_{j-1}``,
        and ``B_j`` causally: the rows of :func:`apbv_mask_reference`, without building it.
        """
        s, hq, _ = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        opts = {k_: v_ for k_, v_ in self.settings.items() if k_ != "mode"}
        out = torch.empty_like(q)
        scale = self.softmax_scale

        def attend(rows, h, keys, mask=None, causal=False):
            """Query heads of KV head ``h`` at ``rows`` over ``keys`` (index tensors)."""
            qh = q[rows, h * group:(h + 1) * group].transpose(0, 1)  # [g, r, d]
            kh, vh = k[keys, h][None], v[keys, h][None]  # [1, t, d]
            o = F.scaled_dot_product_attention(qh, kh.expand(group, -1, -1), vh.expand(group, -1, -1),
                                               attn_mask=mask, is_causal=causal, scale=scale)
            out[rows, h * group:(h + 1) * group] = o.transpose(0, 1)

        if self.settings.get("mode") is None:
            everything = torch.arange(s, device=q.device)
            for h in range(hkv):
                attend(everything, h, everything, causal=True)
            return out
        a, nq = opts["anchor_len"], opts["query_len"]
        bounds = apbv_block_bounds_reference(s, world_size=opts["world_size"], anchor_len=a, query_len=nq,
                                             zigzag=opts.get("zigzag", True))
        selections = apbv_passing_selection_reference(q, k, softmax_scale=scale, **opts)
        arange = lambda lo, hi: torch.arange(lo, hi, device=q.device)
        query_rows, prompt = arange(s - nq, s), arange(0, s)
        query_mask = prompt[None, :] <= query_rows[:, None]  # causal over the whole prompt
        for h in range(hkv):
            if a:
                attend(arange(0, a), h, arange(0, a), causal=True)
            if nq:
                attend(query_rows, h, prompt, mask=query_mask)
            passed = []
            for j, (start, end) in enumerate(bounds):
                if end > start:
                    keys = torch.cat([arange(0, a), *passed, arange(start, end)])
                    seen = keys.numel() - (end - start)
                    own = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
                    mask = torch.cat([own.new_ones(end - start, seen), own], dim=1)
                    attend(arange(start, end), h, keys, mask=mask)
                passed.append(selections[j][h])
        return out


def oracle_spec(settings: dict) -> ModuleSpec:
    return get_gpt_layer_spec_with(ModuleSpec(module=MaskedOracleAttention, params={"settings": settings}))
