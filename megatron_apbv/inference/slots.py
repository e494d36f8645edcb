"""Continuous batched decoding: a fixed number of slots share one static-shape decode step.

``apbv infer --pipeline pipelined`` keeps up to ``jobs.batch_size`` sequences of
one replica in a :class:`DecodeSlots`. Its cache is one
:class:`~megatron_apbv.apbv.decode.DecodeCache` of ``[capacity, slots, hkv, d]``
per layer (``capacity``: the cached rows plus the new tokens of the longest request
joined so far on this rank), so the decode step (:class:`~.decode_step.DecodeRunner`,
CUDA-graph capable) keeps its shapes and buffers until a longer request arrives: the
requests are resolved only when served, so their lengths are not known up front, and
:meth:`DecodeSlots.grow` then moves the sequences in flight to a larger pool and builds
the step again (every rank of the group together). A prefill
joins a free slot by copying its cache rows into the slot and setting the slot's
length, tail flag, position and token in place; a finished sequence frees its slot
(length 1 of zero keys, no tail: a finite row nobody reads). Every row of the step
is computed independently of the others, at the same shape whatever the batch
holds, so a greedy answer does not depend on the sequences it was decoded with.

Tokens are chosen on the device for ``STOP_CHECK_EVERY`` steps at most, then read
by the host once (stop ids, ``max_new_tokens``); a chunk never runs past the
fewest tokens any active sequence may still emit, so no slot outgrows its capacity.
Every rank of the APB-V group holds the same slots in the same order (the tokens
are broadcast from the group's first rank, as in ``generate_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_apbv.apbv.decode import DecodeCache
from megatron_apbv.inference.generate import STOP_CHECK_EVERY
from megatron_apbv.inference.prefill import Prefill
from megatron_apbv.inference.sampling import Sampler
from megatron_apbv.runtime.config import GenerateConfig
from megatron_apbv.runtime.numerics import FiniteTracker, check_finite



@dataclass
class Sequence:
    """One request decoding in a slot: what it emitted so far and when it ends."""

    key: object  # the caller's handle (the job's request index)
    slot: int
    max_new_tokens: int
    stop_ids: frozenset
    sampler: Optional[Sampler]  # None: plain greedy (the step's own argmax)
    ids: list[int] = field(default_factory=list)
    decode_seconds: float = 0.0  # the chunks it was part of

    @property
    def finished(self) -> bool:
        return len(self.ids) >= self.max_new_tokens or (bool(self.ids) and self.ids[-1] in self.stop_ids)

    def take(self, tokens: list[int]) -> None:
        for token in tokens:
            if self.finished:
                return
            self.ids.append(int(token))


class DecodeSlots:
    """``slots`` sequences decoded together; :meth:`join` a prefill, :meth:`run_chunk` steps every active one."""

    def __init__(self, engine, template: Prefill, *, slots: int, capacity: int, cuda_graph: bool, group):
        """``template``: any prefill of this job on this rank (layer count and head shapes of the cache)."""
        layers = template.cache.layers
        k0 = next(iter(layers.values()))[0]
        device = k0.device
        shape = (capacity, slots) + tuple(k0.shape[2:])
        pool = {n: (k0.new_zeros(shape), k0.new_zeros(shape)) for n in layers}
        lengths = torch.ones(slots, dtype=torch.int32, device=device)  # free: one zero key, finite, unread
        tail = torch.zeros(slots, dtype=torch.int32, device=device)
        self.cache = DecodeCache(pool, lengths, tail, template.cache.layout.seq.world_size)
        self.engine, self.cuda_graph = engine, cuda_graph
        self.capacity, self.device, self.group = capacity, device, group
        self.world = dist.get_world_size(group)
        self.src = dist.get_global_rank(group, 0) if self.world > 1 else dist.get_rank()
        positions = template.prompt.position_ids[..., -1:].expand(*template.prompt.position_ids.shape[:-1], slots)
        self.runner = engine.decode_runner(self.cache, positions.clone(), cuda_graph=cuda_graph)
        self.free = list(range(slots))
        self.active: dict[int, Sequence] = {}  # slot -> sequence

    @property
    def mode(self) -> str:
        return self.runner.mode

    def has_free_slot(self) -> bool:
        return bool(self.free)

    def _choose(self, logits: torch.Tensor, greedy: torch.Tensor, samplers: dict[int, Sampler]) -> torch.Tensor:
        token = greedy.clone()
        for slot, sampler in samplers.items():
            token[slot : slot + 1] = sampler(logits[slot : slot + 1])
        if self.world > 1:  # every rank holds the same logits; one source keeps the slots in lockstep
            dist.broadcast(token, src=self.src, group=self.group)
        return token

    def join(self, key, run: Prefill, settings: GenerateConfig, *, seed: int, stop_ids: list[int]) -> Sequence:
        """Place ``run``'s sequence (batch 1) in a free slot; its first token comes from the prefill's logits."""
        if not self.free:
            raise RuntimeError("DecodeSlots.join: no free slot")
        rows = run.cache.num_tokens
        if rows + settings.max_new_tokens > self.capacity:
            raise RuntimeError(f"a prefill of {rows} cached rows + {settings.max_new_tokens} new tokens exceeds "
                               f"the slots' capacity {self.capacity}")
        slot = self.free.pop(0)
        sampler = Sampler(settings, seed, prompt_ids=run.prompt.input_ids)
        plain = sampler.temperature == 0 and sampler.penalty == 1.0
        check_finite(run.logits, "the logits at the end of prefill", self.group)
        first = self._choose(run.logits, run.logits.argmax(-1), {} if plain else {0: sampler})
        for n, (k, v) in run.cache.layers.items():
            pool_k, pool_v = self.cache.layers[n]
            pool_k[:rows, slot] = k[:rows, 0]
            pool_v[:rows, slot] = v[:rows, 0]
        self.cache.lengths[slot] = rows
        self.cache.tail[slot] = int(run.cache.is_tail)
        self.runner.positions[..., slot] = run.prompt.position_ids[..., -1].to(self.device) + 1
        self.runner.tokens[slot] = first[0]
        seq = Sequence(key, slot, settings.max_new_tokens, frozenset(stop_ids), None if plain else sampler)
        seq.take([int(first[0])])
        self.active[slot] = seq
        return seq

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` rows per slot (at least the current), keeping every sequence in flight.

        A new pool takes the rows of the old one, and the decode step is built again over it (captured
        again with CUDA graphs): collective when the step is, so every rank of the group calls it together.
        """
        capacity = max(capacity, self.capacity)
        pool = {}
        for n, (k, v) in self.cache.layers.items():
            grown = [x.new_zeros((capacity,) + tuple(x.shape[1:])) for x in (k, v)]
            for old, new in zip((k, v), grown):
                new[: self.capacity] = old
            pool[n] = tuple(grown)
        old = self.cache
        self.cache = DecodeCache(pool, old.lengths, old.tail, old.world_size)
        tokens = self.runner.tokens.clone()
        self.runner = self.engine.decode_runner(self.cache, self.runner.positions, cuda_graph=self.cuda_graph)
        self.runner.tokens.copy_(tokens)
        self.capacity = capacity

    def release_finished(self) -> list[Sequence]:
        """Free the slots of the finished sequences; returns them in slot order."""
        done = [seq for slot, seq in sorted(self.active.items()) if seq.finished]
        for seq in done:
            del self.active[seq.slot]
            self.cache.lengths[seq.slot] = 1
            self.cache.tail[seq.slot] = 0
            self.free.append(seq.slot)
        self.free.sort()
        return done

    @torch.inference_mode()
    def run_chunk(self) -> int:
        """Up to ``STOP_CHECK_EVERY`` decode steps of every active sequence; returns the steps run.

        Each sequence takes its tokens up to its stop id or ``max_new_tokens``;
        call :meth:`release_finished` after.
        """
        if not self.active:
            return 0
        steps = min([STOP_CHECK_EVERY] + [s.max_new_tokens - len(s.ids) for s in self.active.values()])
        samplers = {slot: s.sampler for slot, s in self.active.items() if s.sampler is not None}
        finite = FiniteTracker(self.device)
        rows = torch.tensor(sorted(self.active), device=self.device)
        chosen = []
        runner = self.runner
        for step in range(steps):
            runner.step()
            finite.update(runner.logits.index_select(0, rows), step)
            token = self._choose(runner.logits, runner.greedy, samplers)
            runner.feed(token)
            chosen.append(token)
        finite.check("the logits of a decode step", self.group)
        tokens = torch.stack(chosen, dim=1).tolist()  # [slots, steps]: the one host read of the chunk
        for slot, seq in self.active.items():
            seq.take(tokens[slot])
        return steps
