"""Distributed decoding: each rank keeps the KV cache of its own tokens (docs/design.md §5).

Rank ``r`` caches its share of ``A`` and its blocks; the tail owner (the owner of
the last block) also caches ``Q`` and every generated token. A new token's query
attends to each rank's cache and the partial ``(out, lse)`` are merged across the
group, which is exact attention over the whole cache. Passing blocks are never
cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from megatron_apbv.apbv.attend import apb_attention
from megatron_apbv.apbv.layout import RankLayout
from megatron_apbv.apbv.merge import MergeAcrossRanks


class LayerCache:
    """Preallocated K/V of one layer: appending a token costs no copy of the cache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, capacity: int):
        shape = (capacity,) + tuple(k.shape[1:])
        self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.length = 0
        self.append(k, v)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.length + k.shape[0]
        if end > self.k.shape[0]:
            raise RuntimeError(f"KV cache full: {end} tokens > capacity {self.k.shape[0]} (raise max_new_tokens)")
        self.k[self.length : end], self.v[self.length : end] = k, v
        self.length = end

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[: self.length], self.v[: self.length]


@dataclass
class DistributedKVCache:
    """The rank's caches for all layers, filled by the prefill and extended while decoding."""

    layout: RankLayout
    max_new_tokens: int
    layers: dict[int, LayerCache] = field(default_factory=dict)

    @property
    def is_tail(self) -> bool:
        return self.layout.holds_query_keys

    @cached_property
    def cached_rows(self) -> torch.Tensor:
        """Local rows this rank keeps after the prefill: anchor share, blocks, and Q on the tail."""
        lay = self.layout
        share = torch.arange(lay.anchor_share.start, lay.anchor_share.stop)
        blocks = torch.arange(lay.anchor_len, lay.local_query_slice.start)
        parts = [share, blocks]
        if self.is_tail:
            parts.append(torch.arange(lay.local_query_slice.start, lay.local_len))
        return torch.cat(parts)

    def store_prefill(self, layer_number: int, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = self.cached_rows.to(k.device)
        capacity = len(rows) + (self.max_new_tokens if self.is_tail else 0)
        self.layers[layer_number] = LayerCache(k[rows], v[rows], capacity)

    @property
    def num_tokens(self) -> int:
        """Tokens cached on this rank (per layer)."""
        return next(iter(self.layers.values())).length if self.layers else 0


@dataclass(frozen=True)
class DecodeStep:
    """``attention_mask`` of a decoding step: the new token attends to the distributed cache."""

    cache: DistributedKVCache


def decode_layer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DistributedKVCache, layer_number: int,
    *, softmax_scale: float, group,
) -> torch.Tensor:
    """Exact attention of new tokens ``q`` ``[t, b, hq, d]`` over the whole distributed cache.

    The tail owner includes the new tokens' own keys (causally) and appends them
    to its cache afterwards; the partials of all ranks are merged by log-sum-exp.
    """
    layer = cache.layers[layer_number]
    k_cache, v_cache = layer.view()
    empty = k[:0]
    k_new, v_new = (k, v) if cache.is_tail else (empty, empty)
    out, lse = apb_attention(
        q, k_cache, v_cache, empty, empty, k_new, v_new, anchor_rows=0, softmax_scale=softmax_scale
    )
    if cache.is_tail:
        layer.append(k, v)
    return MergeAcrossRanks(out, lse, cache.layout.seq.world_size, group, async_op=False).result()
