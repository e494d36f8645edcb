"""Seconds per stage, and how much of the wall time the GPU had work queued.

``apbv infer`` and ``apbv generate`` time each stage of a request (video decode,
vision, prefill, decode) with one :class:`StageClock`. ``sync_first=True`` (the
serial pipeline, ``apbv generate``) waits for the device before a stage starts
and after it ends, so a stage's seconds are its own alone. The pipelined job does
not wait before a stage (the GPU may still run the previous one while the host
queues the next): a stage's seconds run from when the host starts queueing it to
when the device finished it.

On CUDA devices every GPU stage is bracketed by CUDA events on the current
stream; :meth:`StageClock.busy_fraction` is the length of the union of those
intervals over the wall time since the clock started: the fraction of the time
the GPU had work queued. Host-only stages (video decode) are not GPU time. On the
CPU there is no separate device, and the fraction is ``None``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch

from megatron_apbv.runtime.timing import sync


class StageClock:
    """Per-stage seconds (into the ``stages`` dicts the caller passes) and the GPU's busy intervals."""

    def __init__(self, device: torch.device, *, sync_first: bool):
        self.device = device
        self.sync_first = sync_first
        self.cuda = device.type == "cuda"
        self.intervals: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        sync(device)
        self.start_time = time.perf_counter()
        self.origin = self._event() if self.cuda else None

    def _event(self) -> "torch.cuda.Event":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def stage(self, name: str, *sinks: dict, gpu: bool = True):
        """Time the body as stage ``name``; its seconds are added to ``sink[name]`` of every sink.

        ``gpu=False``: a host-only stage (no events, no device waits).
        """
        if gpu and self.sync_first:
            sync(self.device)
        begin = self._event() if gpu and self.cuda else None
        start = time.perf_counter()
        yield
        if gpu:
            if begin is not None:
                end = self._event()
                self.intervals.append((begin, end))
                end.synchronize()
            else:
                sync(self.device)
        seconds = time.perf_counter() - start
        for sink in sinks:
            sink[name] = sink.get(name, 0.0) + seconds

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.start_time

    def busy_fraction(self) -> Optional[float]:
        """Union of the GPU stages' intervals / wall time since the clock started (None on the CPU)."""
        if not self.cuda:
            return None
        sync(self.device)
        wall_ms = self.wall_seconds() * 1000.0
        busy = union_length([(self.origin.elapsed_time(a), self.origin.elapsed_time(b)) for a, b in self.intervals])
        return min(1.0, busy / wall_ms) if wall_ms > 0 else None


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by the ``(start, end)`` intervals (overlaps counted once)."""
    busy, reach = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= reach:
            continue
        busy += b - max(a, reach)
        reach = b
    return busy
