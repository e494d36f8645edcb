"""Layout of the prompt over the APB-V group (docs/design.md §2).

The prompt of ``N`` tokens is ``[A | context | Q]``: an anchor of ``a`` tokens, the
context, and a query of ``q`` tokens. The context is cut into ``2W`` virtual
blocks (zigzag) or ``W`` blocks (zigzag off) by the ``torch.tensor_split`` rule,
so blocks may be empty when the context is short. Rank ``r`` holds

    [ A | B_r | B_{2W-1-r} | Q ]      (zigzag)
    [ A | B_r | Q ]                   (zigzag off)

Everything here is a pure function of the lengths: no tensors on devices, no
torch.distributed. Every rank computes the same layout for every rank, which is
what lets ranks exchange fixed-size buffers without telling each other sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Span:
    """Half-open range ``[start, stop)`` of global token indices."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def indices(self) -> torch.Tensor:
        return torch.arange(self.start, self.stop, dtype=torch.long)


@dataclass(frozen=True)
class RankLayout:
    """What one rank of the APB-V group holds.

    ``blocks`` lists the rank's virtual blocks in local order (the first, then the
    second with zigzag), each as ``(virtual_index, span)``. Local offsets follow
    the order ``[A | blocks... | Q]``.
    """

    rank: int
    seq: "SequenceLayout"
    blocks: tuple[tuple[int, Span], ...]

    @property
    def anchor_len(self) -> int:
        return self.seq.anchor_len

    @property
    def query_len(self) -> int:
        return self.seq.query_len

    @property
    def block_lens(self) -> tuple[int, ...]:
        return tuple(len(span) for _, span in self.blocks)

    @property
    def local_len(self) -> int:
        return self.anchor_len + sum(self.block_lens) + self.query_len

    def local_block_slices(self) -> tuple[slice, ...]:
        """Local slices of the rank's blocks, in the order of ``blocks``."""
        out, start = [], self.anchor_len
        for length in self.block_lens:
            out.append(slice(start, start + length))
            start += length
        return tuple(out)

    @property
    def local_query_slice(self) -> slice:
        return slice(self.local_len - self.query_len, self.local_len)

    @cached_property
    def global_indices(self) -> torch.Tensor:
        """Global token index of every local token, ``[local_len]``."""
        parts = [self.seq.anchor.indices()]
        parts += [span.indices() for _, span in self.blocks]
        parts.append(self.seq.query.indices())
        return torch.cat(parts)

    @property
    def anchor_share(self) -> slice:
        """This rank's share of ``A`` as keys of the exact query attention (docs/design.md §3 step 4)."""
        return self.seq.anchor_share(self.rank)

    @property
    def holds_query_keys(self) -> bool:
        """True on the one rank that also takes ``Q``'s own keys in the query attention."""
        return self.rank == self.seq.tail_rank


@dataclass(frozen=True)
class SequenceLayout:
    """The split of an ``N``-token prompt over a group of ``world_size`` ranks."""

    prompt_len: int
    anchor_len: int
    query_len: int
    world_size: int
    zigzag: bool = True

    @classmethod
    def from_config(cls, cfg) -> "SequenceLayout":
        """The one place a :class:`~megatron_apbv.runtime.config.RunConfig` becomes a layout:
        its prompt, anchor and query lengths over ``parallel.context_parallel_size`` ranks."""
        return cls(
            prompt_len=cfg.prompt_len,
            anchor_len=cfg.anchor_len,
            query_len=cfg.query_len,
            world_size=cfg.parallel.context_parallel_size,
            zigzag=cfg.apbv.setting("zigzag"),
        )

    def __post_init__(self):
        for name in ("prompt_len", "anchor_len", "query_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be >= 1")
        if self.anchor_len + self.query_len > self.prompt_len:
            raise ValueError(
                f"anchor_len + query_len = {self.anchor_len} + {self.query_len} exceeds the prompt "
                f"length {self.prompt_len}: shorten the anchor or the query, or use a longer prompt"
            )

    @property
    def num_blocks(self) -> int:
        return 2 * self.world_size if self.zigzag else self.world_size

    @property
    def anchor(self) -> Span:
        return Span(0, self.anchor_len)

    @property
    def query(self) -> Span:
        return Span(self.prompt_len - self.query_len, self.prompt_len)

    @cached_property
    def block_spans(self) -> tuple[Span, ...]:
        """Global spans of the virtual blocks ``B_0 .. B_{n-1}`` (tensor_split rule)."""
        context = self.prompt_len - self.anchor_len - self.query_len
        base, extra = divmod(context, self.num_blocks)
        spans, start = [], self.anchor_len
        for j in range(self.num_blocks):
            length = base + (1 if j < extra else 0)
            spans.append(Span(start, start + length))
            start += length
        return tuple(spans)

    def owner(self, block: int) -> int:
        """Physical rank that hosts virtual block ``block``."""
        if self.zigzag and block >= self.world_size:
            return 2 * self.world_size - 1 - block
        return block

    def blocks_of(self, rank: int) -> tuple[int, ...]:
        """Virtual blocks of ``rank`` in local order."""
        if self.zigzag:
            return (rank, 2 * self.world_size - 1 - rank)
        return (rank,)

    @property
    def tail_rank(self) -> int:
        """Owner of the last block: it takes ``Q``'s keys (and, when decoding, the cache tail)."""
        return self.owner(self.num_blocks - 1)

    def anchor_share(self, rank: int) -> slice:
        """Rank's share ``A[r*ceil(a/W) : (r+1)*ceil(a/W)]`` (clipped) for the query attention."""
        chunk = math.ceil(self.anchor_len / self.world_size) if self.anchor_len else 0
        start = min(rank * chunk, self.anchor_len)
        return slice(start, min(start + chunk, self.anchor_len))

    def rank(self, rank: int) -> RankLayout:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside the group of {self.world_size} ranks")
        return RankLayout(
            rank=rank,
            seq=self,
            blocks=tuple((j, self.block_spans[j]) for j in self.blocks_of(rank)),
        )

    def ranks(self) -> list[RankLayout]:
        return [self.rank(r) for r in range(self.world_size)]

    def passed_per_block(self, passing_len: int) -> tuple[int, ...]:
        """Keys each virtual block passes: ``min(p, len(B_j))``."""
        return tuple(min(passing_len, len(span)) for span in self.block_spans)

    def scatter_back(self, local_outputs: list[torch.Tensor]) -> torch.Tensor:
        """Inverse map: place each rank's local outputs (seq-first) at their global positions.

        Anchor and query rows are taken from rank 0 (every rank computes them).
        """
        if len(local_outputs) != self.world_size:
            raise ValueError(f"expected {self.world_size} local outputs, got {len(local_outputs)}")
        first = local_outputs[0]
        out = first.new_empty((self.prompt_len,) + tuple(first.shape[1:]))
        for layout, local in zip(self.ranks(), local_outputs):
            if local.shape[0] != layout.local_len:
                raise ValueError(
                    f"rank {layout.rank}: local output has {local.shape[0]} rows, layout says {layout.local_len}"
                )
            out[layout.global_indices] = local
        anchor, query = self.rank(0).global_indices[: self.anchor_len], self.query.indices()
        out[anchor] = first[: self.anchor_len]
        out[query] = first[first.shape[0] - self.query_len :]
        return out
