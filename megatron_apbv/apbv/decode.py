"""Distributed decoding: each rank keeps the KV cache of its own tokens (docs/design.md §5).

Rank ``r`` caches its share of ``A`` and its blocks; the tail owner (the owner of
the last block) also caches ``Q`` and every generated token. A new token's query
attends to each rank's cache and the partial ``(out, lse)`` are merged across the
group, which is exact attention over the whole cache. Passing blocks are never
cached.

The decode step has static shapes so that it can be captured in a CUDA graph:
every layer's cache is preallocated to its capacity, the number of valid rows of
each sequence lives in a device tensor, new keys are scattered at device-side
positions, and the attention reads the lengths from the device (no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from megatron_apbv.apbv.kernels_dispatch import kernel_for
from megatron_apbv.apbv.layout import RankLayout
from megatron_apbv.apbv.merge import MergeAcrossRanks


@dataclass
class DistributedKVCache:
    """One prefill's cache on this rank: the rows it keeps, for all layers, at decoding capacity.

    Filled by the prefill (``APBVInferenceContext.prefill_cache``); :meth:`DecodeCache.from_prefills`
    turns one or several of them into the batched cache a decode step reads.
    """

    layout: RankLayout
    max_new_tokens: int
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

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

    @property
    def num_tokens(self) -> int:
        """Prompt tokens cached on this rank (per layer and sequence)."""
        return len(self.cached_rows)

    @property
    def capacity(self) -> int:
        # every rank, not only the tail, keeps room for the new tokens: a decode step writes
        # the new keys of every row at its length (non-tail rows never count them), static shapes
        return self.num_tokens + self.max_new_tokens

    def store_prefill(self, layer_number: int, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = self.cached_rows.to(k.device)
        shape = (self.capacity,) + tuple(k.shape[1:])
        k_cache, v_cache = k.new_empty(shape), v.new_empty(shape)
        k_cache[: len(rows)], v_cache[: len(rows)] = k[rows], v[rows]
        self.layers[layer_number] = (k_cache, v_cache)


@dataclass
class DecodeCache:
    """The batched, static-shape cache of a decode step: per layer ``k``, ``v`` ``[capacity, b, hkv, d]``.

    ``lengths[i]`` counts the valid rows of sequence ``i`` on this rank; ``tail[i]``
    is 1 where this rank owns sequence ``i``'s new tokens (it caches them and
    attends to them causally), else 0. Both are int32 device tensors.
    """

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor
    tail: torch.Tensor
    world_size: int

    @classmethod
    def from_prefills(cls, caches: list[DistributedKVCache]) -> "DecodeCache":
        """One batch of the prefills' sequences, in order; a single prefill is adopted without a copy."""
        device = next(iter(caches[0].layers.values()))[0].device
        lengths = torch.tensor(
            [c.num_tokens for c in caches for _ in range(_batch(c))], dtype=torch.int32, device=device
        )
        tail = torch.tensor([int(c.is_tail) for c in caches for _ in range(_batch(c))], dtype=torch.int32,
                            device=device)
        world = caches[0].layout.seq.world_size
        if len(caches) == 1:
            return cls(dict(caches[0].layers), lengths, tail, world)
        capacity = max(c.capacity for c in caches)
        layers = {}
        for n in caches[0].layers:
            k0 = caches[0].layers[n][0]
            shape = (capacity, int(lengths.numel())) + tuple(k0.shape[2:])
            k_all, v_all = k0.new_empty(shape), k0.new_empty(shape)
            row = 0
            for c in caches:
                k, v = c.layers[n]
                b = k.shape[1]
                k_all[: c.num_tokens, row : row + b] = k[: c.num_tokens]
                v_all[: c.num_tokens, row : row + b] = v[: c.num_tokens]
                row += b
            layers[n] = (k_all, v_all)
        return cls(layers, lengths, tail, world)

    @property
    def batch_size(self) -> int:
        return int(self.lengths.numel())

    @property
    def capacity(self) -> int:
        return next(iter(self.layers.values()))[0].shape[0]


def _batch(cache: DistributedKVCache) -> int:
    return next(iter(cache.layers.values()))[0].shape[1]


@dataclass(frozen=True)
class DecodeStep:
    """The state of one decoding step: ``t`` new tokens per sequence over the distributed cache.

    ``visible`` ``[b]`` (device) is the number of keys each sequence's last new
    token sees on this rank: the cached rows plus, on the tail, the new tokens.
    Megatron's layers get it inside an
    :class:`~megatron_apbv.apbv.inference_context.APBVInferenceContext`; the fused
    layers take it directly.
    """

    cache: DecodeCache
    visible: torch.Tensor

    @classmethod
    def begin(cls, cache: DecodeCache, new_tokens: int) -> "DecodeStep":
        return cls(cache, cache.lengths + cache.tail * new_tokens)

    def commit(self) -> None:
        """After all layers: the tail's new tokens become part of the cache (in place, on the device)."""
        self.cache.lengths.copy_(self.visible)


def decode_layer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: DecodeStep, layer_number: int,
    *, softmax_scale: float, group,
) -> torch.Tensor:
    """Exact attention of new tokens ``q`` ``[t, b, hq, d]`` over the whole distributed cache.

    The new keys are written at each sequence's length first (on a non-tail rank
    that row is scratch space the visible length leaves out), then the tail owner
    attends to them causally; the partials of all ranks are merged by log-sum-exp.
    """
    k_cache, v_cache = step.cache.layers[layer_number]
    t, b = k.shape[:2]
    positions = step.cache.lengths.long()[None, :] + torch.arange(t, device=k.device)[:, None]  # [t, b]
    rows = torch.arange(b, device=k.device).expand(t, b)
    k_cache.index_put_((positions, rows), k)
    v_cache.index_put_((positions, rows), v)
    return attend_cached(q, step, layer_number, softmax_scale=softmax_scale, group=group)


def attend_cached(q: torch.Tensor, step: DecodeStep, layer_number: int, *, softmax_scale: float, group) -> torch.Tensor:
    """:func:`decode_layer_attention` once the new keys are in the cache: attention, then the cross-rank merge."""
    cache = step.cache
    k_cache, v_cache = cache.layers[layer_number]
    out, lse = decode_attention(q, k_cache, v_cache, step.visible, cache.tail, softmax_scale=softmax_scale)
    if cache.world_size == 1:
        return out
    return MergeAcrossRanks(out, lse, cache.world_size, group, async_op=False).result()


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, tail: torch.Tensor,
    *, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``t`` new tokens ``q`` ``[t, b, hq, d]`` over a cache ``[capacity, b, hkv, d]``.

    Sequence ``i`` has ``lengths[i]`` valid keys; where ``tail[i]`` is 1 its last
    ``t`` keys are the new tokens themselves, seen causally (token ``j`` sees keys
    ``< lengths[i] - (t - 1 - j)``), else every token sees all of them. GQA: query
    head ``h`` reads KV head ``h // (hq // hkv)``. Returns ``(out [t, b, hq, d],
    lse [b, hq, t] fp32)``; a token that sees no key gets ``out = 0``, ``lse = -inf``.
    Rows past a length are never read into the result (they may hold anything).
    This torch version defines the operation (CPU, tests); CUDA runs the kernel (its default route: the
    separate split combine, which needs no scratch).
    """
    kernel = kernel_for("decode_attention", q)
    if kernel is not None:
        return kernel(q, k_cache, v_cache, lengths, tail, softmax_scale=softmax_scale)
    t, b, hq, d = q.shape
    capacity, _, hkv, _ = k_cache.shape
    new = torch.arange(t, device=q.device)
    bound = lengths.long()[:, None] - tail.long()[:, None] * (t - 1 - new)[None, :]  # [b, t]
    visible = torch.arange(capacity, device=q.device)[None, None, :] < bound[:, :, None]  # [b, t, capacity]
    valid = (torch.arange(capacity, device=q.device)[:, None] < lengths.long()[None, :])[..., None, None]
    kf = torch.where(valid, k_cache.float(), 0.0)
    vf = torch.where(valid, v_cache.float(), 0.0)
    qf = q.float().view(t, b, hkv, hq // hkv, d)
    scores = torch.einsum("tbhgd,nbhd->bhgtn", qf, kf) * softmax_scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, hkv, g, t]
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    out = torch.einsum("bhgtn,nbhd->tbhgd", probs, vf)
    return out.reshape(t, b, hq, d).to(q.dtype), lse.reshape(b, hq, t)
