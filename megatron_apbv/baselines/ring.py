"""Exact zigzag ring attention over the context-parallel group: a benchmark baseline.

The prompt of ``N`` tokens is cut into ``2W`` chunks by the ``torch.tensor_split``
rule and rank ``r`` holds chunks ``r`` and ``2W-1-r`` (the zigzag balance of
causal work). That is exactly :class:`~megatron_apbv.apbv.layout.SequenceLayout` with
no anchor and no query, whose virtual blocks are the chunks, so no layout code is
repeated here: :func:`ring_layout` builds it.

Every rank starts from its own K/V and passes whatever it holds to rank ``r+1``
while it receives from rank ``r-1`` (``batch_isend_irecv``), overlapped with the
attention over the K/V it already holds. After ``W-1`` hops every rank has seen
every other rank's K/V once. Which query rows see which key chunk follows from
the chunk order alone:

* step 0 (own K/V): chunk ``r`` is causal for its own queries and fully visible to
  the late chunk ``2W-1-r``, which is causal over itself;
* K/V of a rank ``s < r``: only its early chunk ``s`` is earlier than anything
  here, and it is fully visible to both local chunks;
* K/V of a rank ``s > r``: both of its chunks lie between ``r`` and ``2W-1-r``,
  fully visible to the late chunk and invisible to the early one.

Each partial is an :func:`~megatron_apbv.apbv.attend.apb_attention` call (fully visible
keys as its "passing" keys, a diagonal chunk as its causal "block" keys, so the
Triton kernel runs on GPUs) and partials are combined by the exact log-sum-exp
merge :func:`~megatron_apbv.apbv.merge.merge_partials`, accumulated in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_apbv.apbv.attend import apb_attention
from megatron_apbv.apbv.core_attention import CoreAttentionBase, RankPlan
from megatron_apbv.apbv.layout import RankLayout, SequenceLayout
from megatron_apbv.apbv.merge import merge_partials


def ring_layout(prompt_len: int, world_size: int) -> SequenceLayout:
    """Plain zigzag CP layout: ``2W`` chunks, rank ``r`` holds chunks ``r`` and ``2W-1-r``."""
    return SequenceLayout(prompt_len, anchor_len=0, query_len=0, world_size=world_size, zigzag=True)


@dataclass(frozen=True)
class RingMask:
    """Structured causal mask of ring attention: the rank's zigzag layout (no O(N^2) tensor)."""

    layout: RankLayout

    def __post_init__(self):
        seq = self.layout.seq
        if seq.anchor_len or seq.query_len or not seq.zigzag:
            raise ValueError("RingMask needs the plain zigzag layout of ring_layout(N, W) (no anchor, no query)")


class _Accumulator:
    """Running ``(out fp32, lse)`` of some query rows, merged exactly as partials arrive."""

    def __init__(self):
        self.out: Optional[torch.Tensor] = None
        self.lse: Optional[torch.Tensor] = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        out = out.float()
        if self.out is None:
            self.out, self.lse = out, lse
            return
        self.out, self.lse = merge_partials(torch.stack([self.out, out]), torch.stack([self.lse, lse]))


def _peers(group, world: int, rank: int) -> tuple[int, int]:
    """Global ranks of the next and the previous rank of the ring."""
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    return ranks[(rank + 1) % world], ranks[(rank - 1) % world]


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: RankLayout,
    *,
    softmax_scale: float,
    group=None,
) -> torch.Tensor:
    """Exact causal attention of this rank's zigzag rows over the whole sequence.

    ``q`` ``[L, b, hq, d]``, ``k``/``v`` ``[L, b, hkv, d]`` (RoPE applied, seq-first)
    with ``L`` = the lengths of the rank's two chunks; returns ``[L, b, hq, d]``.
    """
    seq, rank = layout.seq, layout.rank
    world = seq.world_size
    if q.shape[0] != layout.local_len:
        raise ValueError(f"local sequence has {q.shape[0]} tokens, the ring layout says {layout.local_len}")
    early = layout.block_lens[0]
    kv = torch.stack([k, v])  # one message per hop: [2, L, b, hkv, d]
    acc_early, acc_late = _Accumulator(), _Accumulator()
    if world > 1:
        send_to, recv_from = _peers(group, world, rank)

    def empty(t):
        return t[:0]

    for step in range(world):
        src = (rank - step) % world  # the rank whose K/V we hold now
        pending, incoming = [], None
        if step < world - 1:
            # Post the next hop before computing, so the transfer overlaps this step's attention.
            nxt = seq.rank((rank - step - 1) % world)
            incoming = kv.new_empty((2, nxt.local_len) + tuple(kv.shape[2:]))
            pending = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, kv, send_to, group=group),
                dist.P2POp(dist.irecv, incoming, recv_from, group=group),
            ])
        k_src, v_src = kv[0], kv[1]
        src_early = seq.rank(src).block_lens[0]
        if step == 0:
            ke, ve = k_src[:early], v_src[:early]
            kl, vl = k_src[early:], v_src[early:]
            acc_early.add(*apb_attention(
                q[:early], empty(ke), empty(ve), empty(ke), empty(ve), ke, ve,
                anchor_rows=0, softmax_scale=softmax_scale,
            ))
            acc_late.add(*apb_attention(
                q[early:], ke, ve, empty(ke), empty(ve), kl, vl, anchor_rows=0, softmax_scale=softmax_scale,
            ))
        elif src < rank:
            ke, ve = k_src[:src_early], v_src[:src_early]
            out, lse = apb_attention(
                q, ke, ve, empty(ke), empty(ve), empty(ke), empty(ve), anchor_rows=0, softmax_scale=softmax_scale,
            )
            acc_early.add(out[:early], lse[..., :early])
            acc_late.add(out[early:], lse[..., early:])
        else:
            acc_late.add(*apb_attention(
                q[early:], k_src, v_src, empty(k_src), empty(v_src), empty(k_src), empty(v_src),
                anchor_rows=0, softmax_scale=softmax_scale,
            ))
        for work in pending:
            work.wait()
        if incoming is not None:
            kv = incoming
    return torch.cat([acc_early.out, acc_late.out]).to(q.dtype)


class RingCoreAttention(CoreAttentionBase):
    """Zigzag ring attention as Megatron's ``core_attention`` (the constructor of every core attention here).

    ``attention_mask`` must be a :class:`RingMask`; query ``[sq, b, np, hn]``, key/value
    ``[sq, b, ng, hn]`` with RoPE applied; output ``[sq, b, np * hn]``.
    """

    @classmethod
    def rank_plan(cls, cfg, rank: int, world: int) -> RankPlan:
        """Chunks ``r`` and ``2W-1-r`` of the plain zigzag split; the last token lives on rank 0."""
        n = cfg.prompt_len
        seq = ring_layout(n, world)
        owner = next(r for r in range(world) if (seq.rank(r).global_indices == n - 1).any())
        row = int((seq.rank(owner).global_indices == n - 1).nonzero())
        layout = seq.rank(rank)
        return RankPlan(layout.global_indices, RingMask(layout), owner, row)

    def forward(self, query, key, value, attention_mask: RingMask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        self.reject_bias_and_packing("ring attention", attention_bias, packed_seq_params)
        if not isinstance(attention_mask, RingMask):
            raise TypeError(
                f"RingCoreAttention needs attention_mask=RingMask(layout); got {type(attention_mask).__name__}"
            )
        out = ring_attention(query, key, value, attention_mask.layout,
                             softmax_scale=self.softmax_scale, group=self.cp_group)
        return out.reshape(out.shape[0], out.shape[1], -1)
