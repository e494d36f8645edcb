"""Where a decoding step's time goes: ``apbv generate`` under ``torch.profiler``, one table per rank.

    torchrun --nproc_per_node W benchmarks/profile_decode.py CONFIG [key=value ...] --out DIR

The prefill of a short prompt is included in the profile; with ``generate.max_new_tokens`` large
enough the decoding steps dominate. Writes ``DIR/profile_decode_rank{r}.txt`` (operators by self CPU
and by self device time) and prints the record of ``apbv generate``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from megatron_apbv.inference.generate import apbv_generate
    from megatron_apbv.runtime.distributed import (
        LaunchEnv,
        init_distributed,
        select_device,
        shutdown,
    )
    from megatron_apbv.models.resolve import load_config

    cfg = load_config(args.config, args.overrides)
    env = LaunchEnv.from_environ()
    device = select_device(cfg, env)
    init_distributed(cfg, env, device)
    apbv_generate(cfg, device)  # warm-up: kernel compilation, NCCL communicators
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        record = apbv_generate(cfg, device)
    device_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages()
    text = (f"rank {env.rank}: {json.dumps({k: v for k, v in record.items() if k != 'generated_ids'})}\n\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=30) + "\n\n"
            + table.table(sort_by=device_key, row_limit=30) + "\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"profile_decode_rank{env.rank}.txt").write_text(text)
    if env.rank == 0:
        print(text, flush=True)
    shutdown()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
