"""Start megatron_apbv ranks as plain processes (no launcher) and collect them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distributed_utils import free_port

from fault_injection import FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny_cpu.yaml")
FAULTY_ENTRY = str(ROOT / "tests" / "apbv_with_faults.py")  # megatron_apbv's CLI with the test-only fault hook
STARTUP = 90  # seconds a group of CPU ranks may take to import torch + Megatron on a loaded 2-core machine

# Variables an outer launcher may have set; each test sets its own.
_STRIP = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
          "ROLE_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", FAULT_ENV}


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _STRIP and not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def spawn(world, argv_of_rank, env_of_rank=lambda rank: {}, port=None):
    """``world`` plain processes of megatron_apbv's CLI (no launcher; through the test-only fault hook)."""
    port = port or free_port()
    procs = []
    for rank in range(world):
        env = clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), **env_of_rank(rank))
        procs.append(subprocess.Popen([sys.executable, FAULTY_ENTRY, *argv_of_rank(rank)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def collect(procs, deadline_s, wait_for=None):
    """Wait for the ranks in ``wait_for`` (default all); kill whatever is left. Returns [(rc, out, err)]."""
    wait_for = range(len(procs)) if wait_for is None else wait_for
    end = time.monotonic() + deadline_s
    try:
        for rank in wait_for:
            procs[rank].wait(timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    results = []
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results


def show(results) -> str:
    return "\n".join(f"--- rank {r}: rc={rc}\n{err[-1500:]}" for r, (rc, _, err) in enumerate(results))
