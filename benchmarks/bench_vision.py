"""Our Qwen2.5-VL vision tower against transformers' tower, on one GPU, in one run.

    PYTHONPATH=$PWD python benchmarks/bench_vision.py --out $OUT [--profile] [--probe]

Qwen2.5-VL-7B vision config (depth 32, hidden 1280, 16 heads, MLP 3420, out 3584,
window 112, patch 14, merge 2, temporal patch 2, full attention in blocks 7/15/23/31),
random weights (transformers' initialisation, copied into ours through the state
dict), bf16, random patches. Shapes: 64 frames at 1428 x 2548 (594,048 patches),
64 frames at 728 x 1288 (720p), 4 frames at 224 x 392 (224p). For every shape, one
row per reference: transformers' tower with ``batch_vision_segments`` (one SDPA call
per block) and without (the per-window SDPA loop transformers runs with ``sdpa``;
on the 1440p shape only when the time budget allows, which the row says).

Row: ``{frames, frame_size, patches, seconds, tflops, reference_seconds, reference,
max_abs_diff, ...}``; ``seconds`` is the median of ``--repeat`` warm calls of ours,
``first_call_seconds`` the first call of ours at that shape (plan build and, on the
first shape, the Triton kernels' compilation), ``tflops`` the counted work
(:func:`megatron_apbv.models.vision_tower.vision_tower_flops`) per second;
``max_abs_diff``/``rel_diff`` compare ours with that reference, and
``reference_pair_max_abs_diff`` the two transformers variants with each other
(the bf16 noise floor). ``--profile`` writes a torch.profiler kernel table of one
call of ours on the largest shape; ``--probe`` times the attention backends and
the MLP GEMM shapes in isolation. JSON lines on stdout, the whole record in
``--out``/vision_gpu.json. Exit status 1 when a measurement failed or ours differs
from the references by more than ``--max-rel-diff``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_apbv.models.vision_attention import batch_vision_segments, build_transformers_tower  # noqa: E402
from megatron_apbv.models.vision_tower import VisionTower, VisionTowerConfig, vision_tower_flops  # noqa: E402

QWEN25_VL_7B = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                    window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                    fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)
SHAPES = [(4, (224, 392)), (64, (728, 1288)), (64, (1428, 2548))]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def emit(record):
    print(json.dumps(record), flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int):
    """(median seconds, all seconds, last output) of ``repeat`` calls."""
    times, out = [], None
    for _ in range(repeat):
        out = None
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def diff(a, b):
    a, b = a.float(), b.float()
    return (a - b).abs().max().item(), ((a - b).norm() / b.norm()).item()


def grid_of(frames, size):
    p, m, tp = QWEN25_VL_7B["patch_size"], QWEN25_VL_7B["spatial_merge_size"], QWEN25_VL_7B["temporal_patch_size"]
    h, w = size
    assert h % (p * m) == 0 and w % (p * m) == 0
    return torch.tensor([[1, h // p, w // p]] * (-(-frames // tp)))


def probe(record, dev):
    """Attention backends on the tower's segment shapes, and the MLP GEMMs padded / unpadded, in isolation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    groups, length, heads, d = 32, 18564, 16, 80
    flop = 4 * groups * length * length * heads * d
    qkv = torch.randn(groups * length, 3, heads, d, device=dev, dtype=torch.bfloat16, generator=g)
    q, k, v = (t.view(groups, length, heads, d).transpose(1, 2) for t in qkv.unbind(1))
    variants = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, backend in variants.items():
        try:
            def call(backend=backend):
                if backend is None:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            call()
            s, _, _ = timed(call, 3)
            out[f"full_{name}_ms"], out[f"full_{name}_tflops"] = s * 1e3, flop / s / 1e12
        except Exception as exc:  # a backend that refuses the shape is a result here
            out[f"full_{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        cu = torch.arange(0, groups + 1, device=dev, dtype=torch.int32) * length
        qv, kv, vv = qkv.unbind(1)

        def varlen():
            return torch.ops.aten._flash_attention_forward(qv, kv, vv, cu, cu, length, length, 0.0, False, False,
                                                           scale=d ** -0.5)[0]
        varlen()
        s, _, _ = timed(varlen, 3)
        out["full_flash_varlen_ms"], out["full_flash_varlen_tflops"] = s * 1e3, flop / s / 1e12
    except Exception as exc:
        out["full_flash_varlen_error"] = f"{type(exc).__name__}: {exc}"[:300]
    # the same full attention on contiguous [B, H, L, D] copies, and with the head dim zero-padded to 128
    for name, make in (("cudnn_contiguous", lambda t: t.contiguous()),
                       ("cudnn_pad128", lambda t: torch.nn.functional.pad(t, (0, 128 - d)))):
        try:
            qc, kc, vc = make(q), make(k), make(v)

            def call(qc=qc, kc=kc, vc=vc):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, scale=d ** -0.5)
            call()
            s, _, _ = timed(call, 3)
            out[f"full_{name}_ms"], out[f"full_{name}_tflops"] = s * 1e3, flop / s / 1e12
            del qc, kc, vc
        except Exception as exc:
            out[f"full_{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    # windows of one 1440p window block: flash varlen (ours) vs dense cuDNN on 64-long windows (an upper bound:
    # as if every window were full) vs cuDNN on windows padded to 64 with a key mask
    from megatron_apbv.models.vision_tower import build_plan

    plan = build_plan(VisionTowerConfig.from_any(QWEN25_VL_7B), grid_of(64, (1428, 2548)), dev)
    seg = plan.windows
    qv, kv, vv = qkv.unbind(1)
    wflop = 4 * heads * d * sum(n * n for n in seg.lengths)
    try:
        def win_varlen():
            return torch.ops.aten._flash_attention_forward(qv, kv, vv, seg.cu_seqlens, seg.cu_seqlens, seg.max_len,
                                                           seg.max_len, 0.0, False, False, scale=d ** -0.5)[0]
        win_varlen()
        s, _, _ = timed(win_varlen, 5)
        out["windows_flash_varlen_ms"], out["windows_flash_varlen_tflops"] = s * 1e3, wflop / s / 1e12
        nw = qv.shape[0] // 64
        qd, kd, vd = (t[: nw * 64].view(nw, 64, heads, d).transpose(1, 2) for t in (qv, kv, vv))
        dense = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)  # noqa: E731
        dense()
        s, _, _ = timed(dense, 5)
        out["windows_dense64_sdpa_ms"] = s * 1e3
        index, valid = seg.padded()
        qp, kp, vp = (t[index].transpose(1, 2) for t in (qv, kv, vv))
        mask = valid[:, None, None, :]
        masked = lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)  # noqa: E731
        masked()
        s, _, _ = timed(masked, 3)
        out["windows_padded_masked_sdpa_ms"] = s * 1e3
        del qd, kd, vd, qp, kp, vp
    except Exception as exc:
        out["windows_error"] = f"{type(exc).__name__}: {exc}"[:300]
    del qkv, q, k, v
    # the MLP GEMMs of one 1440p call's block: unpadded (transformers) vs padded and fused (ours)
    n = 594048
    x = torch.randn(n, 1280, device=dev, dtype=torch.bfloat16, generator=g)
    for name, inner in (("unpadded_3420", 3420), ("padded_3456", 3456)):
        w_up = torch.randn(inner, 1280, device=dev, dtype=torch.bfloat16, generator=g)
        w_gu = torch.randn(2 * inner, 1280, device=dev, dtype=torch.bfloat16, generator=g)
        w_down = torch.randn(1280, inner, device=dev, dtype=torch.bfloat16, generator=g)
        a = torch.randn(n, inner, device=dev, dtype=torch.bfloat16, generator=g)
        for op, fn, fl in (("up", lambda: torch.nn.functional.linear(x, w_up), 2 * n * 1280 * inner),
                           ("gate_up", lambda: torch.nn.functional.linear(x, w_gu), 4 * n * 1280 * inner),
                           ("down", lambda: torch.nn.functional.linear(a, w_down), 2 * n * 1280 * inner)):
            fn()
            s, _, _ = timed(fn, 3)
            out[f"gemm_{op}_{name}_ms"], out[f"gemm_{op}_{name}_tflops"] = s * 1e3, fl / s / 1e12
        del w_up, w_gu, w_down, a
    sq = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16, generator=g)
    s, _, _ = timed(lambda: sq @ sq, 5)
    out["gemm_8192_cube_tflops"] = 2 * 8192 ** 3 / s / 1e12
    record["probe"] = out
    emit({"probe": out})


def kernel_summary(prof):
    """GPU time by kind of kernel (seconds) from a profiler run."""
    # attention first: flash-attention's kernel names carry "cutlass" too
    kinds = {"attention": ("flash", "fmha", "sdpa", "attention"),
             "gemm": ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas"),
             "triton_elementwise": ("_bias_rms_norm", "_rope_qk", "_silu_mul"),
             "gather/index": ("index", "gather", "scatter"),
             "copy/cast": ("copy", "cast", "elementwise_kernel", "vectorized")}
    totals, rows = {}, []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        if not t:
            continue
        name = evt.key
        low = name.lower()
        kind = next((k for k, keys in kinds.items() if any(s.lower() in low for s in keys)), "other")
        if name.startswith(("aten::", "cuda", "Memcpy", "Memset")) and kind != "other":
            continue  # CPU-side op rows: their kernels are counted under their own names
        if name.startswith("aten::"):
            continue
        totals[kind] = totals.get(kind, 0.0) + t / 1e6
        rows.append((t / 1e6, evt.count, name[:120], kind))
    rows.sort(reverse=True)
    return totals, [dict(seconds=s, calls=c, kernel=n, kind=k) for s, c, n, k in rows[:25]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds: skip the slowest reference past this")
    ap.add_argument("--max-rel-diff", type=float, default=5e-2,
                    help="fail when ours differs from a reference by more (relative L2); also when ours is further "
                         "than 1.5x the two transformers variants' own difference")
    ap.add_argument("--shapes", default="all", help="all, or a comma list of indexes into the shape list")
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script: a 2-block tower, fp32, tiny shapes")
    args = ap.parse_args(argv)
    if args.smoke:
        global QWEN25_VL_7B, SHAPES
        QWEN25_VL_7B = dict(QWEN25_VL_7B, depth=2, hidden_size=64, num_heads=2, intermediate_size=100,
                            out_hidden_size=32, fullatt_block_indexes=[1])
        SHAPES = [(2, (56, 84)), (4, (112, 168))]
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    import transformers
    import triton

    cuda = dev.type == "cuda"
    record = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
              "triton": triton.__version__, "cudnn": torch.backends.cudnn.version() if cuda else None,
              "transformers": transformers.__version__, "config": QWEN25_VL_7B,
              "dtype": str(dtype).replace("torch.", ""), "weights": "random (transformers' init), shared",
              "rows": [], "errors": []}
    failed = False
    try:
        if args.probe:
            probe(record, dev)
    except Exception:
        record["errors"].append("probe: " + traceback.format_exc()[-1500:])
        failed = True
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    with torch.device(dev):
        ref = build_transformers_tower(dict(QWEN25_VL_7B), seed=0, dtype=dtype)
    ours = VisionTower(VisionTowerConfig.from_any(ref.config)).to(device=dev, dtype=dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    batched = batch_vision_segments(copy.deepcopy(ref))
    sync()
    record["build_seconds"] = time.perf_counter() - t0
    log(f"towers built in {record['build_seconds']:.1f} s")

    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    for frames, size in shapes:
        grid_cpu = grid_of(frames, size)
        grid = grid_cpu.to(dev)  # transformers builds its position ids on grid_thw's device
        n = int(grid_cpu.prod(-1).sum())
        flops = vision_tower_flops(ours.config, grid_cpu)
        gen = torch.Generator(device=dev).manual_seed(frames)
        patches = torch.randn(n, 1176, device=dev, dtype=torch.float32, generator=gen)
        base = dict(frames=frames, frame_size=list(size), patches=n, work_tflop=flops / 1e12, device=record["device"])
        try:
            sync()
            t1 = time.perf_counter()
            ours_out = ours(patches, grid)
            sync()
            first = time.perf_counter() - t1
            seconds, all_s, ours_out = timed(lambda: ours(patches, grid), args.repeat)
        except Exception:
            record["errors"].append(f"ours {frames}x{size}: " + traceback.format_exc()[-2000:])
            failed = True
            continue
        refs = {}
        for name, tower in (("transformers+batch_vision_segments", batched), ("transformers", ref)):
            big = n > 400_000
            if name == "transformers" and big and time.perf_counter() - start > args.budget:
                row = dict(base, seconds=seconds, tflops=flops / seconds / 1e12, reference=name,
                           reference_seconds=None, max_abs_diff=None,
                           note=f"skipped: {time.perf_counter() - start:.0f} s of the {args.budget:.0f} s budget used")
                record["rows"].append(row)
                emit(row)
                continue
            try:
                with torch.no_grad():
                    if not big:
                        pooled(tower(patches, grid_thw=grid))  # warm-up
                    reps = 1 if big else args.repeat
                    rs, rall, rout = timed(lambda: pooled(tower(patches, grid_thw=grid)), reps)
                refs[name] = rout
                mad, rel = diff(ours_out, rout)
                row = dict(base, seconds=seconds, tflops=flops / seconds / 1e12, reference=name,
                           reference_seconds=rs, max_abs_diff=mad, rel_diff=rel,
                           reference_tflops=flops / rs / 1e12, speedup=rs / seconds, first_call_seconds=first,
                           ours_all_seconds=all_s, reference_all_seconds=rall,
                           reference_warm=("no warm-up call at this size (1 timed call)" if big else "warm"),
                           output_abs_max=rout.float().abs().max().item())
                if rel > args.max_rel_diff:
                    failed = True
                    row["error"] = f"rel_diff {rel:.3e} > {args.max_rel_diff}"
            except Exception:
                record["errors"].append(f"{name} {frames}x{size}: " + traceback.format_exc()[-2000:])
                failed = True
                continue
            record["rows"].append(row)
            emit(row)
        if len(refs) == 2:
            pair = diff(*refs.values())
            for row in record["rows"][-2:]:
                row["reference_pair_max_abs_diff"], row["reference_pair_rel_diff"] = pair
                if row["rel_diff"] > 1.5 * pair[1] + 1e-3:
                    failed = True
                    row["error"] = f"rel_diff {row['rel_diff']:.3e} > 1.5 x the references' own {pair[1]:.3e}"
        if n < 200_000 and dev.type == "cuda":  # fp32 truth: how far each bf16 tower is from it
            try:
                truth_tower = batch_vision_segments(copy.deepcopy(ref).float())
                with torch.no_grad():
                    truth = pooled(truth_tower(patches, grid_thw=grid)).float()
                del truth_tower
                fp32 = dict(ours_vs_fp32=diff(ours_out, truth),
                            **{f"{k}_vs_fp32": diff(v, truth) for k, v in refs.items()})
                for row in record["rows"][-len(refs):]:
                    row["bf16_vs_fp32_transformers"] = {k: {"max_abs": a, "rel": r} for k, (a, r) in fp32.items()}
                emit({"frames": frames, "frame_size": list(size), "bf16_vs_fp32_transformers": fp32})
                del truth
            except Exception:
                record["errors"].append(f"fp32 truth {frames}x{size}: " + traceback.format_exc()[-1500:])
        del refs, ours_out
        if args.profile and (frames, size) == max(shapes, key=lambda s: s[0] * s[1][0] * s[1][1]):
            try:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    ours(patches, grid)
                    sync()
                try:
                    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=45)
                except Exception:
                    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45)
                tag = record["device"].replace("NVIDIA ", "").split()[0].lower()
                (args.out / f"vision_profile_{tag}.txt").write_text(
                    f"# ours, one call, {frames} frames at {size[0]}x{size[1]} ({n} patches), {record['device']}\n"
                    + table)
                totals, top = kernel_summary(prof)
                record["profile"] = dict(shape=base, gpu_seconds_by_kind=totals, top_kernels=top,
                                         table=f"vision_profile_{tag}.txt")
                emit({"profile": record["profile"]["gpu_seconds_by_kind"]})
            except Exception:
                record["errors"].append("profile: " + traceback.format_exc()[-1500:])
        del patches
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        log(f"{frames}x{size}: done at {time.perf_counter() - start:.0f} s")
    record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
    record["wall_seconds"] = time.perf_counter() - start
    record["ok"] = not failed and not record["errors"]
    (args.out / "vision_gpu.json").write_text(json.dumps(record, indent=1))
    for e in record["errors"]:
        log(e)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
