"""Pass: exchange the selected passing blocks over the APB-V group (docs/design.md §3 step 3).

Each rank owns one block per exchange (two exchanges with zigzag, one without).
Every rank knows every block's length from the layout, so a fixed-size padded
all-gather suffices and nobody has to send sizes: the padding rows are dropped
by the receiver using the same layout.
"""

from __future__ import annotations

import torch

from megatron_apbv.apbv.collectives import all_gather_stacked
from megatron_apbv.apbv.layout import SequenceLayout


class PassingExchange:
    """The all-gathers of one layer's passing blocks and the view of them each block needs."""

    def __init__(self, seq: SequenceLayout, passing_len: int, group, *, overlap: bool):
        self.seq = seq
        self.passed_per_block = seq.passed_per_block(passing_len)
        self.group = group
        self.overlap = overlap
        # exchange e carries, from rank i, the i-th rank's e-th block
        self._gathered: list[torch.Tensor | None] = [None] * (2 if seq.zigzag else 1)
        self._pending: list = [None] * len(self._gathered)

    def exchange_size(self, e: int) -> int:
        return max(self.passed_per_block[self.seq.blocks_of(r)[e]] for r in range(self.seq.world_size))

    def start(self, e: int, k_sel: torch.Tensor, v_sel: torch.Tensor) -> None:
        """Send this rank's selection for exchange ``e`` (``[p_j, b, hkv, d]`` K and V)."""
        size = self.exchange_size(e)
        send = k_sel.new_zeros((2, size) + tuple(k_sel.shape[1:]))
        send[0, : k_sel.shape[0]] = k_sel
        send[1, : v_sel.shape[0]] = v_sel
        world = self.seq.world_size
        if size == 0:  # Star attention (p = 0): nothing to exchange
            self._gathered[e] = send.unsqueeze(0).expand((world,) + tuple(send.shape))
            return
        self._gathered[e], self._pending[e] = all_gather_stacked(send, world, self.group, async_op=self.overlap)

    def passing_for(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``P_0 .. P_{block-1}`` concatenated, ``[n_pass, b, hkv, d]``."""
        parts = []
        for earlier in range(block):
            count = self.passed_per_block[earlier]
            if count == 0:
                continue
            owner = self.seq.owner(earlier)
            e = self.seq.blocks_of(owner).index(earlier)
            parts.append(self._wait(e)[owner, :, :count])
        if not parts:
            gathered = next(g for g in self._gathered if g is not None)
            empty = gathered.new_empty((2, 0) + tuple(gathered.shape[3:]))
            return empty[0], empty[1]
        kv = torch.cat(parts, dim=1)
        return kv[0], kv[1]

    def _wait(self, e: int) -> torch.Tensor:
        if self._pending[e] is not None:
            self._pending[e].wait()
            self._pending[e] = None
        return self._gathered[e]
