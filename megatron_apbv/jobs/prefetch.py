"""The requests a replica claimed ahead, their frames decoded by CPU worker threads meanwhile.

The pipelined job keeps up to ``jobs.prefetch_depth`` requests claimed beyond the
one it starts next (:class:`Lookahead`). As soon as one is claimed, a worker of
the pool (``jobs.prefetch_workers`` threads) resolves its config (probing its video,
tokenizing its text: :meth:`~.requests.PlannedRequest.resolve`) and runs its
``video_decode`` stage (:meth:`~megatron_apbv.inference.engine.Engine.read_prompt`:
decode, sample and resize this rank's temporal share of the frames, render the chat
text) while the GPU serves earlier requests; PyAV and torch release the GIL while they
work. The serial pipeline calls :func:`prepare_request` itself. A request whose config
or decode fails becomes a :class:`Prepared` with its error, which the job turns into
that request's error record. Every rank of a replica holds the
same claimed indices in the same order (the claims are broadcast by
:class:`~.scheduler.WorkQueue`); each decodes its own share.

After SIGTERM the claimed requests not yet started are dropped (not answered):
a resumed job runs them.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_apbv.jobs.requests import PlannedRequest
from megatron_apbv.models.inputs import Prompt
from megatron_apbv.runtime.config import RunConfig


@dataclass
class Prepared:
    """A claimed request after its config was resolved and its video-decode stage ran on this rank."""

    index: int  # into the job's pending list
    cfg: Optional[RunConfig]  # the request's resolved config (None with an error)
    prompt: Optional[Prompt]
    error: Optional[str]  # the request's own failure on this rank (planning, resolving or decoding), else None
    seconds: float  # its resolve + video-decode seconds on this rank


def prepare_request(index: int, item: PlannedRequest, read: Callable[[RunConfig], Prompt]) -> Prepared:
    """Resolve ``item``'s config, then run ``read(cfg)`` (its video-decode stage); a config the request cannot
    have, or an ``OSError``/``ValueError`` of ``read``, becomes its error."""
    if item.error is not None:
        return Prepared(index, None, None, item.error, 0.0)
    start = time.perf_counter()
    cfg, error = item.resolve()  # a missing or unreadable video is this request's error, found here
    prompt = None
    if error is None:
        try:
            prompt = read(cfg)
        except (OSError, ValueError) as err:  # an undecodable video, a question the tokenizer cannot render
            error = str(err)
    return Prepared(index, cfg if error is None else None, prompt, error, time.perf_counter() - start)


class Lookahead:
    """Claimed requests in claim order, each being prepared by the worker pool.

    ``claim()`` returns the next index of this replica or None (the queue is
    empty or the job stops); ``prepare(index)`` is the request's
    :func:`prepare_request` call, run on a worker thread.
    """

    def __init__(self, claim: Callable[[], Optional[int]], prepare: Callable[[int], Prepared], *, depth: int,
                 workers: int):
        self.claim, self.prepare, self.depth = claim, prepare, depth
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="apbv-prefetch")
        self.items: deque[Future] = deque()
        self.exhausted = False

    def fill(self) -> None:
        """Claim until ``depth`` requests wait beyond the next one (one collective per claim)."""
        while not self.exhausted and len(self.items) < self.depth + 1:
            index = self.claim()
            if index is None:
                self.exhausted = True
                return
            self.items.append(self.pool.submit(self.prepare, index))

    def next(self) -> Optional[Prepared]:
        """The oldest claimed request, prepared (waits for its worker); claims one more behind it."""
        self.fill()
        if not self.items:
            return None
        future = self.items.popleft()
        self.fill()
        return future.result()

    def drop(self) -> int:
        """Stop claiming and forget the requests not started (SIGTERM); returns how many were dropped."""
        self.exhausted = True
        dropped = len(self.items)
        for future in self.items:
            future.cancel()
        self.items.clear()
        return dropped

    def close(self) -> None:
        self.drop()
        self.pool.shutdown(wait=True, cancel_futures=True)
