"""Run a function on W CPU ranks over gloo and collect what rank 0 returns."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_RESERVED = []  # lock files held for the life of this process: ports no other test process may pick


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port for a rendezvous that nothing can take between choosing it and the rendezvous binding it.

    ``bind(0)`` and every outgoing connection draw from the kernel's ephemeral range, so a port chosen
    below it cannot be handed to anyone else by the kernel; an exclusive lock file reserves it against
    other test processes on the machine (held until this process exits); and it is checked to be free now.
    """
    lo, _ = _ephemeral_range()
    first, last = (20000, lo - 1) if lo > 21000 else (lo - 2000, lo - 1)
    folder = os.path.join(tempfile.gettempdir(), "apbv-test-ports")
    os.makedirs(folder, exist_ok=True)
    span = last - first + 1
    start = random.randrange(span)
    for i in range(span):
        port = first + (start + i) % span
        lock = open(os.path.join(folder, f"{port}.lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                lock.close()
                continue
        _RESERVED.append(lock)
        return port
    raise RuntimeError(f"no free TCP port in {first}-{last}")


def _entry(rank, world, port, fn, args, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            torch.save(result, result_path)
        if dist.is_initialized():
            # Leave together: a rank tearing gloo down while a peer still talks to it can abort the
            # process ("terminate called without an active exception").
            dist.barrier()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(world: int, fn, *args):
    """``fn(rank, world, *args)`` on ``world`` processes; returns rank 0's return value."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        mp.spawn(_entry, args=(world, free_port(), fn, args, path), nprocs=world, join=True)
        return torch.load(path, weights_only=False)


def gathered_apbv_attention(rank, world, seed, n, anchor, query, q_heads, kv_heads, dim, *, zigzag, **attention):
    """Random ``Q, K, V`` ``[n, heads, dim]`` drawn from ``seed`` (the same on every rank), laid out on ``world``
    ranks, each rank's APB-V layer attention of its rows, gathered on every rank.

    ``attention``: the rest of ``apbv_layer_attention``'s keywords (``passing_len``, ``window``, ``overlap``,
    ``selection``). Returns ``(Q, K, V, layout of the sequence, [each rank's output])``.
    """
    from megatron_apbv.apbv.attention import apbv_layer_attention
    from megatron_apbv.apbv.layout import SequenceLayout

    g = torch.Generator().manual_seed(seed)
    Q, K, V = (torch.randn(n, h, dim, generator=g) for h in (q_heads, kv_heads, kv_heads))
    seq = SequenceLayout(n, anchor, query, world, zigzag=zigzag)
    layout = seq.rank(rank)
    idx = layout.global_indices
    out = apbv_layer_attention(
        Q[idx, None], K[idx, None], V[idx, None], layout, softmax_scale=dim ** -0.5, group=dist.group.WORLD,
        **attention,
    )[:, 0]
    outs = [None] * world
    dist.all_gather_object(outs, out)
    return Q, K, V, seq, outs


def prefill_logits_worker(rank, world, config_path, overrides=()):
    """``run_prefill --compare dense`` of a config on ``world`` ranks, plus the APB-V logits themselves."""
    from megatron_apbv.inference.prefill import apbv_prefill, run_prefill
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    cfg = load_config(config_path, list(overrides) + [f"parallel.context_parallel_size={world}"])
    env = LaunchEnv(rank, world, rank)
    init_distributed(cfg, env, torch.device("cpu"))
    try:
        record = run_prefill(cfg, env, torch.device("cpu"), compare="dense")
        record["logits"] = apbv_prefill(cfg, torch.device("cpu")).logits
        return record
    finally:
        shutdown()


@contextlib.contextmanager
def single_process_groups():
    """One gloo rank with Megatron's TP=1, CP=1 groups (what building a model needs), for in-process tests."""
    from megatron.core import parallel_state

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    parallel_state.initialize_model_parallel(1, context_parallel_size=1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
