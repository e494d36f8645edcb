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
from megatron_apbv.apbv.selection import SelectionRule, rule_scores, select_passing
from megatron_apbv.apbv.spec import get_gpt_layer_spec_with


class MaskedOracleAttention(MegatronModule):
    """Core attention under the APB-V mask of the reference oracle; settings in ``self.settings``.

    ``settings`` is a dict ``mode, world_size, anchor_len, query_len, passing_len, zigzag, window``
    and optionally the selection-rule keywords of the oracle (``selection, frame_start, frame_len,
    recent_fraction``), shared by every layer (set it before a forward); ``mode=None`` means dense
    causal attention. ``passing_lens`` (one per layer, as ``RunConfig.passing_lens`` resolves them)
    replaces ``passing_len`` layer by layer.

    ``batched=True`` (the GPU sweep, benchmarks/quality_budget.py) computes the passing selection with
    the distributed code's own functions (``apbv/selection.py``, batched over examples; tested equal to
    the reference) and attends batched over examples and KV heads. Only there, ``replica_len=a`` says
    the first ``a`` rows of the sequence are a query-aware anchor (thunlp/APB's text setting: the
    question right after the system prompt, then the start of the context, ``a`` tokens at positions
    ``0 .. a-1``): the prompt's blocks see its keys instead of the prompt's own anchor, whose rows stay
    exact and are what the query attends to.
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
        return apbv_mask_reference(query.float(), key.float(), softmax_scale=self.softmax_scale,
                                   **self.reference_options())

    def passing_len(self) -> int:
        """This layer's passing budget: ``passing_lens[layer - 1]`` when given, else ``passing_len``."""
        lens = self.settings.get("passing_lens")
        return lens[self.layer_number - 1] if lens is not None else self.settings["passing_len"]

    def reference_options(self) -> dict:
        """The settings as keywords of the reference oracle (this layer's passing budget)."""
        opts = {k_: v_ for k_, v_ in self.settings.items()
                if k_ not in ("mode", "passing_lens", "batched", "replica_len")}
        opts["passing_len"] = self.passing_len()
        return opts

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, hq, d = query.shape
        # A subclass that looks at the explicit mask (example_mask) gets attention under that mask;
        # otherwise each KV head attends to its visible keys only (same numbers, far less work).
        masked = type(self).example_mask is not MaskedOracleAttention.example_mask
        if self.settings.get("batched") and not masked:
            return self._batched(query, key, value).reshape(s, b, hq * d).to(query.dtype)
        if self.settings.get("replica_len"):
            raise ValueError("settings replica_len (a query-aware anchor) needs batched=True")
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
        opts = self.reference_options()
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


    def _batched(self, query, key, value) -> torch.Tensor:
        """``[s, b, hq, d]``: the oracle's attention for a batch of equally long prompts at once.

        Every example has the same layout, so each row group (anchor, query span, virtual block ``B_j``)
        is one attention call over all examples and KV heads; only the passed keys differ per example
        and head, and there are ``min(p, len(B_i))`` of them from each earlier block for all of them.
        """
        s, b, hq, d = query.shape
        hkv = key.shape[2]
        q, k, v = query, key, value  # attention in the model's dtype (flash / efficient kernels on a GPU)
        opts = self.settings
        off = opts.get("replica_len", 0)
        n, a, nq = s - off, opts.get("anchor_len", 0), opts.get("query_len", 0)
        if off and off != a:
            raise ValueError(f"replica_len={off} must equal anchor_len={a}: the query-aware anchor replaces it")
        scale = self.softmax_scale

        def attend(rows: slice, keys_k, keys_v, mask=None, causal=False):
            """Rows ``rows`` of every example over ``[t, b, hkv, d]`` keys."""
            # K/V repeated per query head (not enable_gqa, which the memory-efficient kernel may not take)
            o = F.scaled_dot_product_attention(q[rows].permute(1, 2, 0, 3),
                                               keys_k.permute(1, 2, 0, 3).repeat_interleave(hq // hkv, dim=1),
                                               keys_v.permute(1, 2, 0, 3).repeat_interleave(hq // hkv, dim=1),
                                               attn_mask=mask, is_causal=causal, scale=scale)
            out[rows] = o.permute(2, 0, 1, 3)

        out = torch.empty_like(q)
        if opts.get("mode") is None:
            attend(slice(0, s), k, v, causal=True)
            return out
        rule = SelectionRule(opts.get("selection", "mean"), frame_start=opts.get("frame_start", 0),
                             frame_len=opts.get("frame_len", 1), recent_fraction=opts.get("recent_fraction", 0.25))
        p, window = self.passing_len(), opts.get("window", 5)
        bounds = apbv_block_bounds_reference(n, world_size=opts["world_size"], anchor_len=a, query_len=nq,
                                             zigzag=opts.get("zigzag", True))
        if off:  # the query-aware anchor's own rows: causal among themselves
            attend(slice(0, off), k[:off], v[:off], causal=True)
        if a:
            attend(slice(off, off + a), k[off:off + a], v[off:off + a], causal=True)
        if nq:
            rows = torch.arange(n - nq, n, device=q.device)
            attend(slice(off + n - nq, s), k[off:], v[off:],
                   mask=torch.arange(n, device=q.device)[None, :] <= rows[:, None])
        anchor = slice(0, off) if off else slice(off, off + a)
        q_query = q[off + n - nq:]
        passed_k, passed_v = [k[anchor]], [v[anchor]]
        for start, end in bounds:
            if end == start:
                continue
            block = slice(off + start, off + end)
            seen = sum(t.shape[0] for t in passed_k)
            length = end - start
            own = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            mask = torch.cat([own.new_ones(length, seen), own], dim=1)
            attend(block, torch.cat([*passed_k, k[block]]), torch.cat([*passed_v, v[block]]), mask=mask)
            if p:
                scores = rule_scores(q_query, k[block], rule, window=window, passing_len=p, block_start=start,
                                     softmax_scale=scale)
                sel_k, sel_v = select_passing(k[block], v[block], scores, p)
                passed_k.append(sel_k)
                passed_v.append(sel_v)
        return out


def oracle_spec(settings: dict) -> ModuleSpec:
    return get_gpt_layer_spec_with(ModuleSpec(module=MaskedOracleAttention, params={"settings": settings}))
