"""Process groups: start torch.distributed at the launch's rendezvous and build Megatron's groups.

Where the process sits in the job (rank, world, rendezvous) comes from
:class:`~megatron_apbv.runtime.launch_env.LaunchEnv`, whatever launcher started it.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_apbv.runtime.agreement import agreement_extra, check_ranks_agree
from megatron_apbv.runtime.config import ConfigError, RunConfig
from megatron_apbv.runtime.launch_env import LaunchEnv
from megatron_apbv.runtime.rendezvous import rendezvous_store, store_beside_group


def select_device(cfg: RunConfig, env: LaunchEnv) -> torch.device:
    """cuda:LOCAL_RANK when a GPU is wanted and present, else the CPU."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible: set device=cpu or run on a GPU node")
    if env.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
            "launch at most one rank per GPU on each node"
        )
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init_distributed(cfg: RunConfig, env: LaunchEnv, device: torch.device) -> dist.Store:
    """Start torch.distributed and Megatron's DP x CP x TP groups (CP = the APB-V group, DP = its replicas).

    The world size is checked against the config first, so a mismatch fails on every
    rank before any rank waits on a rendezvous or a collective. Returns the job's store (the
    rendezvous TCP store, a ``HashStore`` for one process) that the process group was started
    with, for whatever else the job keeps there (``apbv infer``'s work queue); when torch.distributed
    was already running (its starter holds its store), a store of the job's own beside that group.
    """
    cfg.check_world_size(env.world_size)
    if device.type == "cpu" and cfg.dtype == "float16":
        raise ConfigError("dtype=float16 is not supported on the CPU: use float32 or bfloat16")
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend=nccl needs GPUs: use parallel.backend=gloo (or auto) on the CPU")
    if dist.is_initialized():
        store = store_beside_group(env, cfg.parallel.timeout_seconds)
    else:
        # this job's store: a taken MASTER_PORT, or another job's store on it, fails fast (runtime/rendezvous.py)
        store = rendezvous_store(env, cfg.parallel.timeout_seconds)
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=cfg.parallel.timeout_seconds),
            store=store,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor_parallel_size,
        context_parallel_size=cfg.parallel.context_parallel_size,
        distributed_timeout_minutes=cfg.parallel.timeout_seconds / 60,  # a float: timedelta(minutes=...) takes it
    )
    # Every rank must run the same config and code: a mismatch fails on every rank here, not as a hang later.
    check_ranks_agree(cfg, agreement_extra(cfg, env.world_size))
    return store


def shutdown(*, wait_for_peers: bool = True) -> None:
    """Tear down Megatron's groups and torch.distributed (a no-op when they are not running).

    ``wait_for_peers`` first meets the other ranks at a barrier: a rank tearing gloo
    down while a peer still talks to it can abort ("terminate called without an
    active exception"). After a failure, when a peer may be gone, pass False.
    """
    if dist.is_initialized() and wait_for_peers:
        dist.barrier()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
