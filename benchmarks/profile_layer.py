"""Where one APB-V layer's time goes on one GPU, against dense causal SDPA on the same tokens.

W = 1 with N = a + 2 * 32K + q holds the same local tokens as one rank of a W = 2
group at 128K (anchor, two 32K blocks, query); the passing exchange is local.
Median of CUDA-event timings after warm-up, plus a torch.profiler breakdown by
the ``apbv/*`` ranges of ``apbv_layer_attention``.

    python benchmarks/profile_layer.py --out profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F


def cuda_ms(fn, warmup=3, repeat=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--block", type=int, default=32768)
    args = parser.parse_args()

    from megatron_apbv.apbv.attention import apbv_layer_attention
    from megatron_apbv.apbv.layout import SequenceLayout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("nccl", rank=0, world_size=1)
    hq, hkv, d = 28, 4, 128
    n_global = 4 * args.block  # the prompt a W=2 rank with these blocks belongs to
    a = -(-n_global // 64 // 128) * 128
    p = -(-n_global // 128 // 128) * 128
    q_len = 64
    n = a + 2 * args.block + q_len
    layout = SequenceLayout(n, a, q_len, 1, zigzag=True).rank(0)
    q, k, v = (torch.randn(n, 1, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    kwargs = dict(passing_len=p, window=5, overlap=True, softmax_scale=d ** -0.5, group=dist.group.WORLD)
    layer_ms = cuda_ms(lambda: apbv_layer_attention(q, k, v, layout, **kwargs))

    qt, kt, vt = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    dense_local_ms = cuda_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True))
    big = [torch.randn(1, h, n_global, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv)]
    dense_global_ms = cuda_ms(lambda: F.scaled_dot_product_attention(*big, is_causal=True, enable_gqa=True), 2, 5)
    del big

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            apbv_layer_attention(q, k, v, layout, **kwargs)
        torch.cuda.synchronize()
    ranges = {}
    for evt in prof.key_averages():
        if evt.key.startswith("apbv/"):
            ranges[evt.key] = {
                "device_ms": round(getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0)) / 3e3, 3),
                "cpu_ms": round(evt.cpu_time_total / 3e3, 3),
            }
    result = {
        "device": torch.cuda.get_device_name(),
        "local_tokens": n, "anchor": a, "passing": p, "block": args.block, "global_prompt_of_w2_rank": n_global,
        "apbv_layer_ms": round(layer_ms, 3),
        "dense_sdpa_same_local_tokens_ms": round(dense_local_ms, 3),
        "dense_sdpa_global_prompt_ms": round(dense_global_ms, 3),
        "ranges_per_layer": ranges,
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(prof.key_averages().table(sort_by="device_time_total" if hasattr(prof.key_averages()[0], "device_time_total") else "cuda_time_total", row_limit=15))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
