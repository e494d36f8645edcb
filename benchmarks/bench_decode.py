"""Decode speed against the memory-bandwidth limit, and checkpoint build + load time, on one GPU (W = 1).

    torchrun --nproc_per_node 1 benchmarks/bench_decode.py configs/qwen25vl_7b_lm.yaml \
        --out benchmarks/results/decode_h200.json [--profile-dir DIR] [--checkpoint-dir /tmp/apbv_ckpt]

For each setting (prompt tokens x batch) the cache is filled with random keys and
values at that length (a decode step's cost does not depend on the values, and
no prefill is needed to measure it), then ``--steps`` decode steps are timed with
CUDA events, replayed from a CUDA graph and eagerly. ``bytes_per_step`` is what
one step must read: every parameter except the embedding table (one row per
sequence), plus each sequence's K and V over all layers. The copy bandwidth is
measured in the same run (a 4 GiB device-to-device copy reads and writes 4 GiB
each: bandwidth = 2 x bytes / time), so ``bandwidth_limit_tokens_per_second =
copy_bandwidth / bytes_per_step x batch``. Then the random model is written to
local disk as a Hugging Face safetensors checkpoint and built + loaded from it.
Writes ``{"rows": [...], "kernel_rows": [...]}``; progress and the profile tables go to stderr / files.

``kernel_rows`` time the decode-attention kernel alone (one layer's cache of the 7B
shape per call, eight layers' caches in turn so that L2 holds none of them, 64
calls replayed from a CUDA graph) next to a device copy of the same bytes (the
valid K and V rows, also eight buffers in turn): ``kernel_gbps`` = bytes read / time,
``copy_gbps`` = (read + write) / time, ``fraction_of_copy`` their ratio, for each
split combine (``in_kernel``, ``kernel``), split count (programs per SM), keys per tile,
stages and warps (``KERNEL_VARIANTS``; ``default`` marks the kernel's own launch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

SETTINGS = ((32768, 1), (131072, 1), (32768, 8))
# kernel rows: (split combine, programs per SM, keys per tile, pipeline stages, warps); the first of each
# combine with 64 / 3 / 4 is the kernel's default launch, the others its neighbours
KERNEL_VARIANTS = (
    ("in_kernel", 1, 64, 3, 4), ("in_kernel", 2, 64, 3, 4), ("in_kernel", 4, 64, 3, 4),
    ("in_kernel", 2, 128, 2, 4), ("in_kernel", 2, 64, 4, 4), ("in_kernel", 2, 64, 3, 8),
    ("kernel", 2, 64, 3, 4), ("kernel", 4, 64, 3, 4), ("kernel", 4, 128, 2, 4), ("kernel", 4, 64, 3, 8),
    ("kernel", 8, 64, 3, 4),
)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def copy_bandwidth_gbps(device, gib: int = 4, repeat: int = 10) -> float:
    """Device-to-device copy bandwidth (GB/s, read + write bytes), best of ``repeat``."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (gib << 30) / best / 1e9


def _graphed_ms(fn, calls: int) -> float:
    """Milliseconds per ``fn(i)`` call, ``calls`` calls captured in one CUDA graph, best of 5 replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def _splits(capacity: int, wanted: int, block_n: int) -> int:
    """The splits a launch really runs: split lengths round up to whole tiles (kernels/decode_attention.py)."""
    split_len = -(-(-(-capacity // wanted)) // block_n) * block_n
    return -(-capacity // split_len)


def kernel_rows(cfg, device, layers: int = 8, calls: int = 64) -> list[dict]:
    """The decode kernel on its own bytes next to a copy of the same bytes (module docstring)."""
    from megatron_apbv.kernels.decode_attention import (BLOCK_N, DEFAULT_COMBINE, PROGRAMS_PER_SM, decode_attention,
                                                        num_splits)

    m = cfg.model
    dtype = getattr(torch, cfg.dtype)
    rows = []
    for prompt_tokens, batch in SETTINGS:
        shape = (prompt_tokens + 16, batch, m.num_query_groups, m.head_dim)
        caches = [tuple(torch.empty(shape, dtype=dtype, device=device).normal_() for _ in range(2))
                  for _ in range(layers)]
        q = torch.randn(1, batch, m.num_attention_heads, m.head_dim, dtype=dtype, device=device)
        lengths = torch.full((batch,), prompt_tokens, dtype=torch.int32, device=device)
        tail = torch.ones_like(lengths)
        counters = torch.zeros(batch * m.num_query_groups, dtype=torch.int32, device=device)
        nbytes = 2 * prompt_tokens * batch * m.num_query_groups * m.head_dim * torch.finfo(dtype).bits // 8
        srcs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(layers)]
        dsts = [torch.empty_like(x) for x in srcs]
        copy_ms = _graphed_ms(lambda i: dsts[i % layers].copy_(srcs[i % layers]), calls)
        del srcs, dsts
        for combine, per_sm, block_n, stages, warps in KERNEL_VARIANTS:
            launch = dict(combine=combine, programs_per_sm=per_sm, block_n=block_n, num_stages=stages,
                          num_warps=warps)

            def call(i, launch=launch):
                k, v = caches[i % layers]
                decode_attention(q, k, v, lengths, tail, softmax_scale=m.head_dim ** -0.5, counters=counters,
                                 **launch)
            try:
                ms = _graphed_ms(call, calls)
            except Exception as exc:  # recorded, not hidden: e.g. a launch that needs too much shared memory
                rows.append({"prompt_tokens": prompt_tokens, "batch_size": batch, **launch, "error": repr(exc)[:300]})
                log(json.dumps(rows[-1]))
                continue
            row = {"prompt_tokens": prompt_tokens, "batch_size": batch, **launch,
                   "default": (combine, per_sm, block_n, stages, warps) == (DEFAULT_COMBINE, PROGRAMS_PER_SM[combine],
                                                                            BLOCK_N, 3, 4),
                   "splits": _splits(shape[0], num_splits(shape[0], batch, m.num_query_groups, device, combine,
                                                          per_sm), block_n),
                   "kv_bytes": nbytes, "kernel_ms": round(ms, 5), "copy_ms": round(copy_ms, 5),
                   "kernel_gbps": round(nbytes / ms / 1e6, 1), "copy_gbps": round(2 * nbytes / copy_ms / 1e6, 1),
                   "device": torch.cuda.get_device_name(device)}
            row["fraction_of_copy"] = round(row["kernel_gbps"] / row["copy_gbps"], 4)
            log(json.dumps(row))
            rows.append(row)
        del caches
        torch.cuda.empty_cache()
    return rows


def random_cache(cfg, prompt_tokens: int, batch: int, extra: int, device):
    """A batched decode cache of ``batch`` sequences of ``prompt_tokens`` random keys/values (this rank is the tail)."""
    from megatron_apbv.apbv.decode import DecodeCache

    m = cfg.model
    shape = (prompt_tokens + extra, batch, m.num_query_groups, m.head_dim)
    dtype = getattr(torch, cfg.dtype)
    layers = {}
    for n in range(1, m.num_layers + 1):
        layers[n] = tuple(torch.empty(shape, dtype=dtype, device=device).normal_() for _ in range(2))
    lengths = torch.full((batch,), prompt_tokens, dtype=torch.int32, device=device)
    return DecodeCache(layers, lengths, torch.ones_like(lengths), world_size=1)


def step_bytes(model, cfg, prompt_tokens: int, batch: int) -> int:
    m = cfg.model
    elem = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "word_embeddings" not in n)
    weights += batch * m.hidden_size * elem  # the embedding rows of the current tokens
    cache = 2 * m.num_layers * batch * prompt_tokens * m.num_query_groups * m.head_dim * elem
    return weights + cache


def time_steps(runner, steps: int) -> float:
    """Milliseconds per step over ``steps`` steps (after 3 warm-up steps), CUDA events."""
    for _ in range(3):
        runner.feed(runner.greedy if runner.greedy is not None else runner.tokens)
        runner.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.feed(runner.greedy)
        runner.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def profile_step(runner, path: Path, title: str) -> None:
    """One decode step under torch.profiler: operators by device time and by CPU time."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        runner.feed(runner.greedy)
        runner.step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    path.write_text(f"{title}\n\n" + table.table(sort_by="self_cuda_time_total", row_limit=25) + "\n\n"
                    + table.table(sort_by="self_cpu_time_total", row_limit=25) + "\n")
    log(f"profile -> {path}")


def hf_checkpoint(model, cfg, folder: Path) -> float:
    """Write ``model``'s weights as a Hugging Face Qwen2 checkpoint (HF names, q/k/v and gate/up unfused).

    Returns the gigabytes written. The layout inverts what megatron_apbv.models.checkpoint reads
    (TP = 1): Megatron's fused QKV holds, per KV group, the group's query heads, its key and its value.
    """
    from safetensors.torch import save_file

    m = cfg.model
    hq, hkv, d = m.num_attention_heads, m.num_query_groups, m.head_dim
    g = hq // hkv
    params = dict(model.named_parameters())
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0

    def qkv(t):  # [hkv * (g + 2) * d, ...] -> q, k, v
        t = t.view(hkv, g + 2, d, *t.shape[1:])
        return (t[:, :g].reshape(hq * d, *t.shape[3:]), t[:, g].reshape(hkv * d, *t.shape[3:]),
                t[:, g + 1].reshape(hkv * d, *t.shape[3:]))

    def flush(tensors: dict, index: int):
        nonlocal total
        name = f"model-{index:05d}.safetensors"
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        total += sum(v.numel() * v.element_size() for v in cpu.values())
        save_file(cpu, str(folder / name))
        weight_map.update({k: name for k in cpu})

    head = {"model.embed_tokens.weight": params["embedding.word_embeddings.weight"],
            "model.norm.weight": params["decoder.final_layernorm.weight"],
            "lm_head.weight": params["output_layer.weight"]}
    flush(head, 0)
    for i in range(m.num_layers):
        pre, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = qkv(params[pre + "self_attention.linear_qkv.weight"])
        out = {hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v,
               hf + "self_attn.o_proj.weight": params[pre + "self_attention.linear_proj.weight"],
               hf + "input_layernorm.weight": params[pre + "input_layernorm.weight"],
               hf + "post_attention_layernorm.weight": params[pre + "pre_mlp_layernorm.weight"],
               hf + "mlp.down_proj.weight": params[pre + "mlp.linear_fc2.weight"]}
        if pre + "self_attention.linear_qkv.bias" in params:
            qb, kb, vb = qkv(params[pre + "self_attention.linear_qkv.bias"])
            out.update({hf + "self_attn.q_proj.bias": qb, hf + "self_attn.k_proj.bias": kb,
                        hf + "self_attn.v_proj.bias": vb})
        gate, up = params[pre + "mlp.linear_fc1.weight"].chunk(2)
        out.update({hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up})
        flush(out, i + 1)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile-dir", default=None)
    parser.add_argument("--checkpoint-dir", default="/tmp/apbv_decode_ckpt")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--eager-steps", type=int, default=8, help="steps timed eagerly (the slow path)")
    parser.add_argument("--skip-checkpoint", action="store_true", help="no checkpoint write + load")
    args = parser.parse_args()

    from megatron_apbv.inference.decode_step import DecodeRunner
    from megatron_apbv.models.gpt import build_gpt_model, build_rope
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, select_device, shutdown
    from megatron_apbv.models.resolve import load_config

    cfg = load_config(args.config, args.overrides + ["parallel.context_parallel_size=1"])
    env = LaunchEnv.from_environ()
    device = select_device(cfg, env)
    torch.cuda.set_device(device)
    init_distributed(cfg, env, device)
    bandwidth = copy_bandwidth_gbps(device)
    log(f"copy bandwidth {bandwidth:.0f} GB/s")
    with torch.inference_mode():
        kernels = kernel_rows(cfg, device)
    _write(args.out, [], kernels, quiet=True)
    random_timings: dict = {}
    model = build_gpt_model(cfg, method="apbv", device=device, timings=random_timings)
    rope = build_rope(cfg, device)
    log(f"random model built on the GPU in {random_timings['build_seconds']:.2f} s")
    rows = []
    with torch.inference_mode():
        for prompt_tokens, batch in SETTINGS:
            cache = random_cache(cfg, prompt_tokens, batch, args.steps + 16, device)
            start_lengths = cache.lengths.clone()
            width = 3 if cfg.model.mrope_section else 0
            pos = torch.full((width, batch) if width else (batch,), prompt_tokens, dtype=torch.long, device=device)
            nbytes = step_bytes(model, cfg, prompt_tokens, batch)
            for graphed in (True, False):
                cache.lengths.copy_(start_lengths)
                runner = DecodeRunner(model, rope, cache, pos, cuda_graph=graphed)
                if not graphed:
                    runner.step()  # allocates the output buffers
                step_ms = time_steps(runner, args.steps if graphed else args.eager_steps)
                if args.profile_dir and prompt_tokens == SETTINGS[0][0] and batch == 1:
                    Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
                    profile_step(runner, Path(args.profile_dir) / f"profile_step_{runner.mode}.txt",
                                 f"one decode step, {prompt_tokens} tokens, batch {batch}, {runner.mode}")
                row = {
                    "world_size": 1, "layers": cfg.model.num_layers, "prompt_tokens": prompt_tokens,
                    "batch_size": batch, "decode_mode": runner.mode, "step_ms": round(step_ms, 4),
                    "decode_tokens_per_second": round(batch * 1e3 / step_ms, 2), "bytes_per_step": nbytes,
                    "copy_bandwidth_gbps": round(bandwidth, 1),
                    "bandwidth_limit_tokens_per_second": round(bandwidth * 1e9 / nbytes * batch, 2),
                    "dtype": cfg.dtype, "device": torch.cuda.get_device_name(device),
                    "decode_layers": runner.layers_path,
                }
                row["fraction_of_limit"] = round(row["decode_tokens_per_second"]
                                                 / row["bandwidth_limit_tokens_per_second"], 4)
                log(json.dumps(row))
                rows.append(row)
                _write(args.out, rows, kernels, quiet=True)  # partial results survive a time limit
                del runner
            del cache
            torch.cuda.empty_cache()

    if args.skip_checkpoint:
        _write(args.out, rows, kernels)
        shutdown()
        return
    # Checkpoint of this shape on local disk, then a fresh build + load from it.
    folder = Path(args.checkpoint_dir)
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    gigabytes = hf_checkpoint(model, cfg, folder)
    write_seconds = time.perf_counter() - t0
    log(f"wrote {gigabytes:.1f} GB to {folder} in {write_seconds:.1f} s")
    reference = {n: p[:2].clone() for n, p in model.named_parameters()}  # a slice of each, to check the load
    del model
    torch.cuda.empty_cache()
    loaded_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": str(folder)})})
    timings: dict = {}
    loaded = build_gpt_model(loaded_cfg, method="apbv", device=device, timings=timings)
    same = all(torch.equal(p[:2], reference[n]) for n, p in loaded.named_parameters())
    log(f"checkpoint build {timings['build_seconds']:.2f} s + load {timings['load_seconds']:.2f} s; equal={same}")
    shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        row.update(checkpoint_gb=round(gigabytes, 2), build_seconds=timings["build_seconds"],
                   load_seconds=timings["load_seconds"], checkpoint_loaded_equal=same,
                   random_init_seconds=random_timings["build_seconds"])
    _write(args.out, rows, kernels)
    shutdown()


def _write(out: str, rows: list, kernels: list, quiet: bool = False) -> None:
    result = {"rows": rows, "kernel_rows": kernels}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    if not quiet:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
