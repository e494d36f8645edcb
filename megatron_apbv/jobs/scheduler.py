"""Dynamic work distribution over the data-parallel replicas of ``apbv infer``.

Requests differ in length, so a static split leaves replicas idle. Instead each
replica's leader claims the next pending request from a counter in the job's
torch.distributed store (``store.add``: atomic on the store's server, one round
trip) and broadcasts the claimed index inside its replica group; a replica that
finishes early simply claims more. The same store holds the done/error counters
rank 0's progress bar reads. The store is the one the process group was started with
(:func:`~megatron_apbv.runtime.distributed.init_distributed` returns it; one process: a
``HashStore``), handed in explicitly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_apbv.runtime.host_collectives import any_rank, collective_device

_NEXT, _DONE, _ERRORS, _TOKENS = "apbv/infer/next", "apbv/infer/done", "apbv/infer/errors", "apbv/infer/tokens"


def reset_job_counters(store) -> None:
    """Zero the claim and progress counters in ``store`` (rank 0, before any claim of the job)."""
    for key in (_NEXT, _DONE, _ERRORS, _TOKENS):
        store.delete_key(key)


class WorkQueue:
    """``next(stop)``: the index (into the pending list) this replica answers next, or None when it stops."""

    def __init__(self, num_pending: int, group, store):
        """``store``: the job's store, shared by every rank (what ``init_distributed`` started the group with)."""
        self.num_pending = num_pending
        self.group = group
        self.store = store
        self.size = dist.get_world_size(group)
        self.leader = dist.get_global_rank(group, 0) if self.size > 1 else dist.get_rank()
        self.is_leader = dist.get_rank() == self.leader
        self.device = collective_device(group)
        self.stopped = False  # some rank of the replica got the stop flag (the same on every rank)

    def agree(self, stop: bool) -> bool:
        """Whether any rank of the replica got ``stop`` (the same answer on every rank)."""
        stop = any_rank(stop, self.device, self.group)
        self.stopped = self.stopped or stop
        return stop

    def next(self, stop: bool) -> Optional[int]:
        """Stop (``stop`` on any rank of the replica) or claim the next request and tell the whole replica."""
        if self.agree(stop):
            return None
        index = torch.tensor([-1], dtype=torch.int64, device=self.device)
        if self.is_leader:
            claimed = self.store.add(_NEXT, 1) - 1
            index.fill_(claimed if claimed < self.num_pending else -1)
        if self.size > 1:
            dist.broadcast(index, src=self.leader, group=self.group)
        return None if int(index.item()) < 0 else int(index.item())

    def finished(self, error: bool, tokens: int = 0) -> None:
        """Count one answered request and its generated tokens (leader only) for the progress bar."""
        self.store.add(_ERRORS if error else _DONE, 1)
        if tokens:
            self.store.add(_TOKENS, tokens)

    def counts(self) -> tuple[int, int]:
        """(answered, errors) over all replicas so far."""
        return self.store.add(_DONE, 0), self.store.add(_ERRORS, 0)

    def generated_tokens(self) -> int:
        """Tokens generated over all replicas so far."""
        return self.store.add(_TOKENS, 0)
