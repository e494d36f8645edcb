"""Where this process sits in the job, read from whatever launcher started it.

The DeepSpeed launcher and torchrun set RANK / WORLD_SIZE / LOCAL_RANK and
MASTER_ADDR / MASTER_PORT; plain ``srun`` sets SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID; ``mpirun`` sets Open MPI's, MPICH's/PMI's or MVAPICH's variables.
A process started by none of them runs as a group of one. Pure standard library:
``launch/apbv_entry.py`` uses it before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

# Variable -> the scheduler/MPI variables that stand for it when a launcher did not set it.
LAUNCHER_VARIABLES = {
    "RANK": ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"),
    "LOCAL_RANK": ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"),
    "WORLD_SIZE": ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"),
}
LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")  # what the DeepSpeed launcher appends without --no_local_rank
DEFAULT_MASTER = ("127.0.0.1", 29500)  # one process or one node without a launcher-given rendezvous


def launcher_value(name: str, environ: Mapping[str, str]) -> Optional[str]:
    """``environ[name]``, else the first scheduler/MPI variable that stands for it, else None."""
    for key in (name, *LAUNCHER_VARIABLES.get(name, ())):
        if environ.get(key, "") != "":
            return environ[key]
    return None


def strip_local_rank(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """``argv`` without ``--local_rank N`` / ``--local_rank=N`` (either spelling), and the value if any."""
    out, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg in LOCAL_RANK_FLAGS and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif "=" in arg and arg.split("=", 1)[0] in LOCAL_RANK_FLAGS:
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
    return out, value


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str = DEFAULT_MASTER[0]
    master_port: int = DEFAULT_MASTER[1]

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ, local_rank: Optional[int] = None) -> "LaunchEnv":
        """The launch as ``environ`` describes it; ``local_rank`` (a ``--local_rank`` flag) when LOCAL_RANK is unset."""

        def number(name: str, default: int) -> int:
            value = launcher_value(name, environ)
            return int(value) if value is not None else default

        return cls(
            rank=number("RANK", 0),
            world_size=number("WORLD_SIZE", 1),
            local_rank=number("LOCAL_RANK", local_rank if local_rank is not None else 0),
            master_addr=environ.get("MASTER_ADDR") or DEFAULT_MASTER[0],
            master_port=int(environ.get("MASTER_PORT") or DEFAULT_MASTER[1]),
        )

    @property
    def init_method(self) -> str:
        """The TCP rendezvous of torch.distributed (nothing is written into the environment)."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"
