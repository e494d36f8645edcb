"""Timing on CPUs and GPUs: synchronised wall clock for one process, CUDA events and the slowest rank for groups."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_apbv.runtime.host_collectives import all_max


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int, *, barrier: bool = True):
    """``fn()``'s result and its seconds: one call, or the median of ``repeat`` calls after a warm-up call.

    The warm-up keeps one-off costs (kernel compilation, autotuning, allocator
    growth) out of the number when ``repeat > 0``.
    """
    times = []
    for _ in range(1 + repeat):
        if barrier:
            dist.barrier()
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        if barrier:
            dist.barrier()
        times.append(time.perf_counter() - start)
    measured = sorted(times[1:] if repeat else times)
    return result, measured[len(measured) // 2]




def _all_gather_floats(value: float, device: torch.device, group) -> list[float]:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [x.item() for x in out]


@dataclass
class Timing:
    times_ms: list[float]  # per timed run, the slowest rank's
    peak_gib: Optional[list[float]]  # per rank (GPUs), None on CPUs
    status: str  # "ok" or "oom"
    result: object = None  # this rank's last result of fn


def time_method(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int, group) -> Timing:
    """Run ``fn`` ``warmup`` + ``repeat`` times, each after a barrier over ``group``; the slowest rank counts.

    Every rank passes the same barriers and collectives whatever happens, so a rank
    that runs out of memory (dense on rank 0) reports it instead of hanging its peers.
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, failed, result = [], 0.0, None
    for i in range(warmup + repeat):
        dist.barrier(group=group)
        sync(device)
        elapsed = 0.0
        if not failed:
            try:
                if cuda:
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    result = fn()
                    stop.record()
                    torch.cuda.synchronize(device)
                    elapsed = start.elapsed_time(stop)
                else:
                    t0 = time.perf_counter()
                    result = fn()
                    elapsed = (time.perf_counter() - t0) * 1e3
            except torch.OutOfMemoryError:
                failed, result = 1.0, None
                if cuda:
                    torch.cuda.empty_cache()
        if i >= warmup:
            times.append(elapsed)
    *times, failed = all_max(times + [failed], device, group)
    peak = _all_gather_floats(torch.cuda.max_memory_allocated(device) / 2**30, device, group) if cuda else None
    return Timing(times, peak, "oom" if failed else "ok", result)
