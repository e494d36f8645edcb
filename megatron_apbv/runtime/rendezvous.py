"""The rendezvous store of one job, on MASTER_ADDR:MASTER_PORT, and the check that it is this job's.

Two jobs launched on one port (two DeepSpeed launches with the default 29500): the
second job's rank 0 cannot listen there, and its other ranks connect to the *first*
job's store. Left alone they then publish their gloo addresses under the first
job's keys: the second job waits out its timeout and the first one can hang. Here,

* rank 0 creates the store and, when the port is taken, fails at once with a
  :class:`PortInUseError` naming the port and the fix (``MASTER_PORT``);
* rank 0 writes who it is (host, launcher node index, parent process) under ``apbv/job``;
  every other rank of that host and node reads it before touching anything else in the
  store, and a rank whose launcher (parent process) differs from rank 0's leaves at once:
  that store belongs to another job. (Every launcher starts a node's ranks from one
  process: torchrun's agent, DeepSpeed's launch.py, ``srun``'s step daemon, ``mpirun``.
  Ranks of other nodes cannot be told apart this way and are not checked; nor can ranks
  started by hand from separate shells on one host, which this check refuses.)

Under torchrun the agent holds the port with the job's store, and every rank joins it.
A group of one needs no port: it gets an in-memory store.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist

from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.runtime.launch_env import LaunchEnv

JOB_KEY = "apbv/job"


class PortInUseError(ConfigError):
    """MASTER_PORT is taken (by another job): the message names the port and how to choose another."""


# The launcher's node index (DeepSpeed, torchrun, our scripts, SLURM): two per-node launchers may share a host.
_NODE_VARIABLES = ("CROSS_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_NODEID")


def _identity(environ) -> tuple[str, str, str]:
    """(host, launcher node index, parent process) of this rank."""
    node = next((environ[v] for v in _NODE_VARIABLES if environ.get(v, "") != ""), "0")
    return socket.gethostname(), node, str(os.getppid())


def rendezvous_store(env: LaunchEnv, timeout_seconds: int, environ=os.environ) -> dist.Store:
    """This job's store at ``env``'s rendezvous, for ``init_process_group(store=...)``.

    Raises :class:`PortInUseError` on a taken port.
    """
    rank, world_size = env.rank, env.world_size
    if world_size == 1:
        return dist.HashStore()
    addr, port = env.master_addr, env.master_port
    if not 0 < port < 2**16:
        raise ConfigError(f"MASTER_PORT={port} is not a port number (1-65535)")
    timeout = timedelta(seconds=timeout_seconds)
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent already holds the port with this job's store (a second torchrun on it fails there).
        return dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    fix = (f"MASTER_PORT={port} on {addr} is already in use (another job?): give this job a free port "
           "(MASTER_PORT=..., torchrun/deepspeed --master_port ...)")
    if rank == 0:
        try:
            store = dist.TCPStore(addr, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                                  multi_tenant=True)
        except (RuntimeError, OSError) as err:  # DistNetworkError is a RuntimeError
            text = str(err).lower()
            if "eaddrinuse" in text or "address already in use" in text:
                raise PortInUseError(fix) from None
            raise
        store.set(JOB_KEY, "\n".join(_identity(environ)))
        return store
    store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout, wait_for_workers=False)
    owner_host, owner_node, owner_parent = store.get(JOB_KEY).decode().split("\n")  # waits for rank 0 to write it
    host, node, parent = _identity(environ)
    if (owner_host, owner_node) == (host, node) and owner_parent != parent:
        raise PortInUseError(
            f"the store on MASTER_PORT={port} belongs to another job (its rank 0 was started by process "
            f"{owner_parent}, this rank by {parent}): {fix}"
        )
    return store


def store_beside_group(env: LaunchEnv, timeout_seconds: int) -> dist.Store:
    """A store of this job's own when its caller (a harness such as lmms-eval) started torch.distributed and
    keeps that group's store to itself: rank 0 serves a TCP store on a free port of ``MASTER_ADDR`` and its
    address reaches the other ranks through the caller's default group (every rank calls this)."""
    if env.world_size == 1:
        return dist.HashStore()
    timeout = timedelta(seconds=timeout_seconds)
    address: list = [None]
    if env.rank == 0:
        store = dist.TCPStore(env.master_addr, 0, env.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        address = [(env.master_addr, store.port)]
    dist.broadcast_object_list(address, src=0)
    if env.rank != 0:
        store = dist.TCPStore(address[0][0], address[0][1], env.world_size, is_master=False, timeout=timeout,
                              wait_for_workers=False)
    return store
