"""PyTorch's own context parallelism (``torch.distributed.tensor.experimental.context_parallel``) as a
reference point for ``apbv bench``'s ring baseline: one causal SDPA layer, the same shapes, the same GPUs.

    torchrun --nproc_per_node 2 benchmarks/torch_native_cp.py --lengths 32768,65536,131072 --out F.json

PyTorch shards ``q``/``k``/``v`` along the sequence with its head-tail load balancer and rotates K/V
between ranks (``--rotate alltoall``: the ring; ``allgather``: gather all K/V first). Its SDPA dispatch
takes equal head counts, so the 4 KV heads are repeated to 28 (the same attention; more bytes in the
exchange than a GQA-aware ring). Each number is the median of ``--repeat`` runs after ``--warmup``, the
slowest rank's time by CUDA events. Rank 0 prints one JSON line per length and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rotate", choices=("alltoall", "allgather"), default="alltoall")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    set_rotate_method(args.rotate)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(length)  # the same full tensors on every rank
        shape = (1, args.heads, length, args.head_dim)
        q = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn((1, args.kv_heads, length, args.head_dim), generator=g, device="cuda",
                            dtype=torch.bfloat16).repeat_interleave(args.heads // args.kv_heads, dim=1)
                for _ in range(2))
        times = []
        torch.cuda.reset_peak_memory_stats()
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            for i in range(args.warmup + args.repeat):
                dist.barrier()
                torch.cuda.synchronize()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                stop.record()
                torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(start.elapsed_time(stop))
            local_rows = out.shape[2]
        t = torch.tensor(times, dtype=torch.float64, device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        row = {"method": f"torch_cp_{args.rotate}", "level": "layer", "length": length, "world_size": world,
               "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "local_rows": local_rows,
               "median_ms": round(statistics.median(t.tolist()), 4), "times_ms": [round(x, 4) for x in t.tolist()],
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 4),
               "device_name": torch.cuda.get_device_name(), "torch": torch.__version__}
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        del q, k, v, out
        torch.cuda.empty_cache()
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
