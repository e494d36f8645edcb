"""Launcher-neutral entry point for ``megatron_apbv``.

Used where a launcher can only start a Python *file* (DeepSpeed's
``--launcher slurm`` always runs ``python -u <script>``) or starts ranks
without the torch-style environment (``srun`` without a launcher, ``mpirun``).

It does two things, then runs ``python -m megatron_apbv`` in-process:

1. Fills in RANK / LOCAL_RANK / WORLD_SIZE from SLURM, Open MPI, MPICH/PMI or
   MVAPICH variables when they are not already set. Variables a launcher
   already set (torchrun, the DeepSpeed per-node launcher) are never changed.
2. Removes ``--local_rank=N`` / ``--local-rank=N`` / ``--local_rank N`` from
   argv (the DeepSpeed launcher adds it unless ``--no_local_rank``), putting
   the value into LOCAL_RANK when that is unset.

``APBV_MODULE`` names a different module to run (used by the launch tests).
"""

from __future__ import annotations

import os
import runpy
import sys

_FALLBACKS = {
    "RANK": ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"),
    "LOCAL_RANK": ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"),
    "WORLD_SIZE": ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"),
}

_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def normalise_env(env: dict) -> dict:
    """Set missing RANK/LOCAL_RANK/WORLD_SIZE in ``env`` from scheduler/MPI variables."""
    for key, sources in _FALLBACKS.items():
        if env.get(key):
            continue
        for src in sources:
            if env.get(src):
                env[key] = env[src]
                break
    return env


def strip_local_rank(argv: list[str], env: dict) -> list[str]:
    """Return ``argv`` without local-rank flags; record their value in ``env``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in _LOCAL_RANK_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
        elif arg.split("=", 1)[0] in _LOCAL_RANK_FLAGS and "=" in arg:
            value = arg.split("=", 1)[1]
            i += 1
        else:
            out.append(arg)
            i += 1
            continue
        env.setdefault("LOCAL_RANK", value)
    return out


def main() -> None:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    args = strip_local_rank(sys.argv[1:], os.environ)
    normalise_env(os.environ)
    module = os.environ.get("APBV_MODULE", "megatron_apbv")
    sys.argv = [module] + args
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
