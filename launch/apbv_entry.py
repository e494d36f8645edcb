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


def _launch_env_module():
    """``megatron_apbv.runtime.launch_env`` (stdlib only), importable before the package is installed."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    from megatron_apbv.runtime import launch_env

    return launch_env


def normalise_env(env: dict) -> dict:
    """Set missing RANK/LOCAL_RANK/WORLD_SIZE in ``env`` from scheduler/MPI variables (never overwrite)."""
    launch_env = _launch_env_module()
    for key in launch_env.LAUNCHER_VARIABLES:
        value = launch_env.launcher_value(key, env)
        if value is not None:
            env.setdefault(key, value)
    return env


def strip_local_rank(argv: list[str], env: dict) -> list[str]:
    """Return ``argv`` without local-rank flags; record their value in ``env`` (LOCAL_RANK, when unset)."""
    out, value = _launch_env_module().strip_local_rank(argv)
    if value is not None:
        env.setdefault("LOCAL_RANK", value)
    return out


def main() -> None:
    args = strip_local_rank(sys.argv[1:], os.environ)
    normalise_env(os.environ)
    module = os.environ.get("APBV_MODULE", "megatron_apbv")
    sys.argv = [module] + args
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
