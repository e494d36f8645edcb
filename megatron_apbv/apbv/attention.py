"""APB-V core attention: the ``core_attention`` submodule of Megatron's ``SelfAttention``.

One layer of prefill on rank ``r`` (docs/design.md §3):
score -> select -> pass (async all-gather) -> attend (query, first block,
second block) -> merge (exact query attention by log-sum-exp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from torch.profiler import record_function

from megatron_apbv.apbv.attend import apb_attention
from megatron_apbv.apbv.attention_routes import describe_layer
from megatron_apbv.apbv.core_attention import CoreAttentionBase, RankPlan
from megatron_apbv.apbv.decode import decode_layer_attention
from megatron_apbv.apbv.inference_context import APBVInferenceContext
from megatron_apbv.apbv.layout import RankLayout, SequenceLayout
from megatron_apbv.apbv.merge import MergeAcrossRanks
from megatron_apbv.apbv.passing import PassingExchange
from megatron_apbv.apbv.selection import PAPER_RULE, SelectionRule, rule_scores, select_passing


@dataclass(frozen=True)
class APBVMask:
    """The APB-V attention mask of one rank, in structured form, with every setting a layer needs.

    Megatron hands ``attention_mask`` unchanged to the core attention; APB-V's mask
    is fully described by the rank's layout, the per-layer passing budgets and the
    scoring settings, so this object travels there instead of an ``O(N^2)`` boolean
    tensor. It is the one way settings reach a layer: the same model serves every
    variant (APB-V, APB-like, Star, exact) and every prompt length. It holds
    settings only: a request's KV cache and decode step are its
    :class:`~megatron_apbv.apbv.inference_context.APBVInferenceContext`.
    """

    layout: RankLayout
    passing_lens: tuple[int, ...]  # per layer, already resolved to token counts
    window: int = 5  # max-pool smoothing window of the passing scores
    overlap: bool = True  # overlap the passing all-gathers and the query merge with attention
    selection: SelectionRule = PAPER_RULE  # which keys of a block are passed (issue 19)

    @classmethod
    def from_config(cls, cfg, layout: RankLayout) -> "APBVMask":
        """The mask of ``layout`` under ``cfg``'s APB-V settings (variant applied)."""
        return cls(layout=layout, passing_lens=cfg.passing_lens(layout.seq.prompt_len), window=cfg.apbv.window,
                   overlap=cfg.apbv.setting("overlap"), selection=SelectionRule.from_config(cfg))

    def passing_len(self, layer_number: int) -> int:
        return self.passing_lens[layer_number - 1]


class APBVCoreAttention(CoreAttentionBase):
    """Distributed APB-V attention over Megatron's context-parallel group.

    Inputs follow Megatron's core-attention contract: query ``[sq, b, np, hn]``,
    key/value ``[sq, b, ng, hn]`` with RoPE applied, ``attention_mask`` an
    :class:`APBVMask` (a prefill that keeps nothing) or an
    :class:`~megatron_apbv.apbv.inference_context.APBVInferenceContext` (a prefill
    that fills the request's KV cache, or a decode step over it); output
    ``[sq, b, np * hn]``. Every APB-V setting arrives with the mask and every piece
    of request state with the context; the module itself holds neither.
    """

    @classmethod
    def rank_plan(cls, cfg, rank: int, world: int) -> RankPlan:
        """``[A | blocks | Q]`` of ``rank``: every rank holds the query span, so the last token too."""
        layout = SequenceLayout.from_config(cfg).rank(rank)
        return RankPlan(layout.global_indices, APBVMask.from_config(cfg, layout), None, layout.local_len - 1)

    @classmethod
    def attention_backend(cls, cfg, rank: int, world: int, dtype: torch.dtype, device: torch.device) -> dict:
        """The route of each block and of the query partial on ``rank`` (``attention_routes.describe_layer``)."""
        return describe_layer(SequenceLayout.from_config(cfg).rank(rank), cfg.model.head_dim, dtype, device)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: APBVMask | APBVInferenceContext,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        self.reject_bias_and_packing("APB-V attention", attention_bias, packed_seq_params)
        context = attention_mask if isinstance(attention_mask, APBVInferenceContext) else None
        if context is not None and context.is_decode_only():
            out = decode_layer_attention(
                query, key, value, context.step, self.layer_number,
                softmax_scale=self.softmax_scale, group=self.cp_group,
            )
            return out.reshape(out.shape[0], out.shape[1], -1)
        mask = context.mask if context is not None else attention_mask
        if not isinstance(mask, APBVMask):
            raise TypeError(
                "APBVCoreAttention needs attention_mask=APBVMask(...) (prefill) or APBVInferenceContext(...) "
                f"(prefill filling a KV cache, decoding); got {type(attention_mask).__name__}. Run the model "
                "through megatron_apbv.inference.prefill / generate."
            )
        layout = mask.layout
        if layout.seq.world_size != self.cp_size:
            raise ValueError(
                f"the APBVMask's layout is for {layout.seq.world_size} ranks but the context-parallel group has "
                f"{self.cp_size}: build the layout with parallel.context_parallel_size={self.cp_size}"
            )
        if query.shape[0] != layout.local_len:
            raise ValueError(f"local sequence has {query.shape[0]} tokens, the layout says {layout.local_len}")
        out = apbv_layer_attention(
            query, key, value, layout,
            passing_len=mask.passing_len(self.layer_number),
            window=mask.window, overlap=mask.overlap, selection=mask.selection,
            softmax_scale=self.softmax_scale, group=self.cp_group,
        )
        if context is not None and context.prefill_cache is not None:
            context.prefill_cache.store_prefill(self.layer_number, key, value)
        return out.reshape(out.shape[0], out.shape[1], -1)


def apbv_layer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: RankLayout,
    *,
    passing_len: int,
    window: int,
    overlap: bool,
    softmax_scale: float,
    group,
    selection: SelectionRule = PAPER_RULE,
) -> torch.Tensor:
    """APB-V attention of one rank's local ``[A | blocks | Q]`` tokens; returns ``[sq, b, hq, d]``."""
    seq = layout.seq
    a = layout.anchor_len
    q_rows = layout.local_query_slice
    block_slices = layout.local_block_slices()
    q_query = q[q_rows]

    # 1-3. Score and select each owned block, and start its exchange as soon as it is selected.
    exchange = PassingExchange(seq, passing_len, group, overlap=overlap)
    for e, rows in enumerate(block_slices):
        with record_function("apbv/score_select_pass"):
            selected = (k[rows][:0], v[rows][:0])
            if passing_len > 0 and rows.stop > rows.start:
                scores = rule_scores(q_query, k[rows], selection, window=window, passing_len=passing_len,
                                     block_start=layout.blocks[e][1].start, softmax_scale=softmax_scale)
                selected = select_passing(k[rows], v[rows], scores, passing_len)
            exchange.start(e, *selected)

    # 4. Exact query attention: local partial over this rank's share of the keys, merged across ranks.
    with record_function("apbv/query_attention"):
        query_merge = MergeAcrossRanks(
            *_query_partial(q_query, k, v, layout, softmax_scale), seq.world_size, group, async_op=overlap
        )

    # 5-6. Blocks: the first also carries the anchor rows; passing blocks arrive as needed.
    anchor = slice(0, a)
    outputs = []
    for e, ((virtual, _), rows) in enumerate(zip(layout.blocks, block_slices)):
        with record_function("apbv/passing_wait_collect"):
            k_pass, v_pass = exchange.passing_for(virtual)
        with record_function("apbv/block_attention"):
            q_rows_block = slice(0, rows.stop) if e == 0 else rows
            out, _ = apb_attention(
                q[q_rows_block], k_pass, v_pass, k[anchor], v[anchor], k[rows], v[rows],
                anchor_rows=a if e == 0 else 0, softmax_scale=softmax_scale,
            )
        outputs.append(out)

    # 7. [out_A | out_B_first | out_B_second | out_Q]
    with record_function("apbv/query_merge"):
        outputs.append(query_merge.result())
    with record_function("apbv/assemble"):
        return torch.cat(outputs)


def _query_partial(q_query, k, v, layout: RankLayout, softmax_scale: float):
    """``(out, lse)`` of the query rows over [anchor share | own blocks | Q (tail rank only)]."""
    blocks = slice(layout.anchor_len, layout.local_query_slice.start)
    share = layout.anchor_share
    tail = layout.local_query_slice if layout.holds_query_keys else slice(0, 0)
    return apb_attention(
        q_query, k[blocks], v[blocks], k[share], v[share], k[tail], v[tail],
        anchor_rows=0, softmax_scale=softmax_scale,
    )
