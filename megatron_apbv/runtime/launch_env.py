"""Which rank this process is: read from the launcher's environment without importing torch.

The command line reads it before the heavy imports, so that a config error names its rank
within milliseconds of the launch (``runtime/distributed.py`` re-exports it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls, environ=os.environ) -> "LaunchEnv":
        """torchrun / DeepSpeed (RANK, WORLD_SIZE, LOCAL_RANK), else SLURM; none of them: a group of one."""

        def pick(*names: str, default: int) -> int:
            for name in names:
                if environ.get(name, "") != "":
                    return int(environ[name])
            return default

        return cls(
            rank=pick("RANK", "SLURM_PROCID", default=0),
            world_size=pick("WORLD_SIZE", "SLURM_NTASKS", default=1),
            local_rank=pick("LOCAL_RANK", "SLURM_LOCALID", default=0),
        )
