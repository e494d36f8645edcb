"""Visible (query, key) pairs of each rank, counted from the real layouts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_apbv.apbv.layout import SequenceLayout


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def ring_pair_matrix(prompt_len: int, world_size: int) -> np.ndarray:
    """``R[r, s]``: causal (query, key) pairs between the tokens of rank ``r`` and of rank ``s``.

    Ring attention with zigzag cuts the whole prompt into ``2W`` chunks
    (``tensor_split`` rule) and rank ``r`` holds chunks ``r`` and ``2W-1-r``; at
    step ``t`` rank ``r`` attends to the K/V of rank ``(r - t) mod W``.
    """
    seq = SequenceLayout(prompt_len, 0, 0, world_size, zigzag=True)
    lens = np.array([len(s) for s in seq.block_spans], dtype=np.int64)
    chunk = np.tril(np.outer(lens, lens), -1) + np.diag(lens * (lens + 1) // 2)  # [2W, 2W]
    owner = np.array([seq.owner(j) for j in range(seq.num_blocks)])
    onehot = np.zeros((seq.num_blocks, world_size), dtype=np.int64)
    onehot[np.arange(seq.num_blocks), owner] = 1
    return onehot.T @ chunk @ onehot


@dataclass(frozen=True)
class RankPairs:
    """Visible pairs of one APB-V rank, per part of its work (per KV head, one sequence)."""

    anchor: int  # anchor rows, causal inside A (every rank: redundant)
    first: int  # rows of the first block: passing keys + A + the block causally
    second: int  # rows of the second block (zigzag)
    query: int  # query rows over this rank's share of the keys (exact attention, merged)

    @property
    def total(self) -> int:
        return self.anchor + self.first + self.second + self.query


def apbv_pairs(seq: SequenceLayout, passing_len: int) -> list[RankPairs]:
    """Visible pairs of every rank of the APB-V layout ``seq`` with budget ``passing_len``."""
    a, q = seq.anchor_len, seq.query_len
    passed = seq.passed_per_block(passing_len)
    before = np.concatenate([[0], np.cumsum(passed)]).astype(np.int64).tolist()  # keys passed by B_0..B_{j-1}
    out = []
    for r in range(seq.world_size):
        layout = seq.rank(r)
        parts = []
        for j, span in layout.blocks:
            n = len(span)
            parts.append(n * (before[j] + a) + causal_pairs(n))
        parts += [0] * (2 - len(parts))
        share = layout.anchor_share
        query = q * (share.stop - share.start + sum(layout.block_lens))
        query += causal_pairs(q) if layout.holds_query_keys else 0
        out.append(RankPairs(causal_pairs(a), parts[0], parts[1], query))
    return out
