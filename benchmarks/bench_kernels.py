"""Benchmark (and GPU-test) the APB-V Triton kernels.

    python benchmarks/bench_kernels.py --out $OUT/            # writes kernels_<device>.json (+ .png)

1. runs ``pytest tests/test_kernels_gpu.py`` (unless ``--no-tests``);
2. measures the bf16 matrix-product ceiling of the card;
3. sweeps a few tile configs of ``apb_attention`` at the first length;
4. per local length L: ``apb_attention`` on the "causal block + dense prefix"
   workload (block queries over n_pass passing keys, ``a`` anchor keys and a
   causal block of L keys) against SDPA-flash on the same work (one causal
   L x L call plus one dense L x (n_pass + a) call), TFLOP/s counted on the
   visible part of the mask (4 * d * hq * visible pairs); a spot check of
   sampled rows against an fp32 reference; the "first block" layout with
   anchor query rows; the scoring + top-p + gather step and its share of the
   attention time; the LSE merge of the query partials.

Shapes: Qwen2.5-VL-7B attention (28 query heads, 4 KV heads, head dim 128),
batch 1, bf16. Prefix sizes follow the paper's defaults for a global prompt of
N = 4L tokens (W = 2, zigzag: 4 virtual blocks): a = roundup(N/64, 128),
p = roundup(N/128, 128), and the last virtual block sees 3 passing blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import kernels  # noqa: E402  (kernels/ uses relative imports only)

attn_mod = sys.modules["kernels.apb_attention"]

HQ, HKV, D = 28, 4, 128
DT = torch.bfloat16

CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma)
    (128, 64, 8, 3, True),
    (128, 128, 8, 2, True),
    (128, 128, 8, 3, True),
    (128, 64, 8, 4, True),
    (128, 64, 8, 3, False),
    (64, 64, 4, 3, True),
]


def roundup(x, m):
    return (x + m - 1) // m * m


def timed(fn, target_ms=1200.0):
    """Median milliseconds (CUDA events through do_bench), >= ~5 timed runs."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    rep = max(target_ms, 5 * est)
    return do_bench(fn, warmup=max(25.0, 2 * est), rep=rep, return_mode="median")


def run_tests():
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_kernels_gpu.py"], cwd=str(ROOT), capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-40:] if proc.stdout.strip() else []
    print("\n".join(tail))
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "seconds": time.time() - t0,
            "output_tail": "\n".join(tail)}


def matmul_ceiling():
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    ms = timed(lambda: a @ b, 500)
    return 2 * 8192 ** 3 / ms / 1e9


def make_inputs(L, n_pass, a, anchor_rows=0):
    g = torch.Generator(device="cuda").manual_seed(L)

    def r(*shape):
        return torch.randn(shape, device="cuda", dtype=DT, generator=g)

    q = r(anchor_rows + L, 1, HQ, D)
    return q, r(n_pass, 1, HKV, D), r(n_pass, 1, HKV, D), r(a, 1, HKV, D), r(a, 1, HKV, D), \
        r(L, 1, HKV, D), r(L, 1, HKV, D)


def spot_check(q, kp, vp, ka, va, kb, vb, out, lse, scale, n_rows=48):
    """fp32 reference on sampled block rows (anchor_rows = 0 layout)."""
    L = q.shape[0]
    rows = torch.unique(torch.cat([torch.tensor([0, 1, 127, 128, L // 2, L - 1]),
                                   torch.randint(0, L, (n_rows,))])).cuda()
    keys = torch.cat([kp, ka, kb])[:, 0].float()        # [T, hkv, d]
    vals = torch.cat([vp, va, vb])[:, 0].float()
    prefix = kp.shape[0] + ka.shape[0]
    g = HQ // HKV
    qs = q[rows, 0].float().view(len(rows), HKV, g, D)  # [R, hkv, g, d]
    s = torch.einsum("rhgd,thd->hgrt", qs, keys) * scale
    t = torch.arange(keys.shape[0], device="cuda")
    vis = t[None, :] < (prefix + rows[:, None] + 1)      # Lk == Lq: block row i sees j <= i
    s = s.masked_fill(~vis, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)                      # [hkv, g, R]
    ref = torch.einsum("hgrt,thd->rhgd", torch.softmax(s, -1), vals).reshape(len(rows), HQ, D)
    got = out[rows, 0].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    lse_err = (lse[0][:, rows].view(HKV, g, -1) - ref_lse).abs().max().item()
    return rel, lse_err


def sdpa_fns(q, kp, vp, ka, va, kb, vb, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qs = q.permute(1, 2, 0, 3).contiguous()
    kb_s, vb_s = kb.permute(1, 2, 0, 3).contiguous(), vb.permute(1, 2, 0, 3).contiguous()
    kpre = torch.cat([kp, ka]).permute(1, 2, 0, 3).contiguous()
    vpre = torch.cat([vp, va]).permute(1, 2, 0, 3).contiguous()
    F = torch.nn.functional.scaled_dot_product_attention
    mode = "enable_gqa"

    def causal():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F(qs, kb_s, vb_s, is_causal=True, scale=scale, enable_gqa=True)

    def dense():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F(qs, kpre, vpre, is_causal=False, scale=scale, enable_gqa=True)

    try:
        causal()
        dense()
    except Exception as exc:  # flash without GQA support: repeat K/V outside the timing
        print("SDPA flash with enable_gqa failed, repeating K/V:", repr(exc)[:200])
        mode = "repeat_kv"
        g = HQ // HKV
        kb_s, vb_s = kb_s.repeat_interleave(g, 1), vb_s.repeat_interleave(g, 1)
        kpre, vpre = kpre.repeat_interleave(g, 1), vpre.repeat_interleave(g, 1)

        def causal():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F(qs, kb_s, vb_s, is_causal=True, scale=scale)

        def dense():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F(qs, kpre, vpre, is_causal=False, scale=scale)
    return causal, dense, mode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="output directory, or a .json path")
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--nq", type=int, default=128, help="query tokens for the scoring step")
    args = ap.parse_args()

    name = torch.cuda.get_device_name()
    tag = "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()
    out_path = pathlib.Path(args.out)
    if out_path.suffix != ".json":
        out_path = out_path / f"kernels_{tag}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
           "shapes": {"hq": HQ, "hkv": HKV, "d": D, "batch": 1, "dtype": "bf16"}}
    print(f"device {name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)

    if not args.no_tests:
        res["gpu_tests"] = run_tests()

    res["matmul_bf16_tflops"] = matmul_ceiling()
    print(f"bf16 8192^3 matmul: {res['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)

    lengths = [int(x) for x in args.lengths.split(",")]
    scale = D ** -0.5

    def workload(L):
        N = 4 * L
        a = roundup(N // 64, 128)
        p = roundup(N // 128, 128)
        return a, p, 3 * p

    # ---- config sweep at the first length ----
    best = attn_mod.default_config(torch.device("cuda"), D, DT)
    sweep = []
    if not args.no_sweep:
        L = lengths[0]
        a, p, n_pass = workload(L)
        inp = make_inputs(L, n_pass, a)
        flops = 4 * D * HQ * attn_mod.visible_pairs(L, 0, n_pass, a, L)
        best_ms = math.inf
        for cfg in CONFIGS:
            try:
                t0 = time.time()
                attn_mod.apb_attention_impl(*inp, anchor_rows=0, softmax_scale=scale, config=cfg)
                torch.cuda.synchronize()
                comp = time.time() - t0
                ms = timed(lambda: attn_mod.apb_attention_impl(*inp, anchor_rows=0, softmax_scale=scale,
                                                               config=cfg), 800)
            except Exception as exc:
                print(f"config {cfg}: failed {repr(exc)[:200]}", flush=True)
                sweep.append({"config": list(cfg), "error": repr(exc)[:300]})
                continue
            sweep.append({"config": list(cfg), "ms": ms, "tflops": flops / ms / 1e9, "first_call_s": comp})
            print(f"config {cfg}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  (first call {comp:.1f}s)",
                  flush=True)
            if ms < best_ms:
                best_ms, best = ms, cfg
        del inp
        torch.cuda.empty_cache()
    res["sweep_L"] = lengths[0]
    res["sweep"] = sweep
    res["best_config"] = list(best)
    print(f"best config {best}", flush=True)

    rows = []
    for L in lengths:
        a, p, n_pass = workload(L)
        inp = make_inputs(L, n_pass, a)
        q, kp, vp, ka, va, kb, vb = inp
        pairs = attn_mod.visible_pairs(L, 0, n_pass, a, L)
        flops = 4 * D * HQ * pairs
        fn = lambda: attn_mod.apb_attention_impl(*inp, anchor_rows=0, softmax_scale=scale, config=best)  # noqa: E731
        out, lse = fn()
        torch.cuda.synchronize()
        rel, lse_err = spot_check(q, kp, vp, ka, va, kb, vb, out, lse, scale)
        del out, lse
        ms = timed(fn)
        causal, dense, mode = sdpa_fns(q, kp, vp, ka, va, kb, vb, scale)
        ms_c = timed(causal)
        ms_d = timed(dense)
        fl_c = 4 * D * HQ * (L * (L + 1) // 2)
        fl_d = 4 * D * HQ * L * (n_pass + a)
        torch.cuda.empty_cache()

        # first virtual block layout: [A | B] queries (anchor rows causal inside A)
        q1 = torch.randn(a + L, 1, HQ, D, device="cuda", dtype=DT)
        fn1 = lambda: attn_mod.apb_attention_impl(q1, kp, vp, ka, va, kb, vb, anchor_rows=a,  # noqa: E731
                                                  softmax_scale=scale, config=best)
        ms1 = timed(fn1)
        fl1 = 4 * D * HQ * attn_mod.visible_pairs(a + L, a, n_pass, a, L)
        del q1
        torch.cuda.empty_cache()

        # scoring + top-p + gather of one block
        qq = torch.randn(args.nq, 1, HQ, D, device="cuda", dtype=DT)
        sc = kernels.passing_scores(qq, kb, window=5)
        ms_score = timed(lambda: kernels.passing_scores(qq, kb, window=5), 300)
        ms_topk = timed(lambda: torch.topk(sc, p, dim=-1, sorted=False), 300)
        ms_select = timed(lambda: kernels.select_passing(kb, vb, sc, p), 300)
        ms_all = timed(lambda: kernels.select_passing(kb, vb, kernels.passing_scores(qq, kb, window=5), p), 300)

        # merge of W = 4 query partials (q = nq rows)
        outs = torch.randn(4, args.nq, 1, HQ, D, device="cuda", dtype=DT)
        lses = torch.randn(4, 1, HQ, args.nq, device="cuda")
        ms_merge = timed(lambda: kernels.merge_partials(outs, lses), 200)

        row = {
            "L": L, "anchor": a, "p": p, "n_pass": n_pass, "visible_pairs": pairs,
            "ours_ms": ms, "ours_tflops": flops / ms / 1e9,
            "sdpa_mode": mode, "sdpa_causal_ms": ms_c, "sdpa_causal_tflops": fl_c / ms_c / 1e9,
            "sdpa_dense_ms": ms_d, "sdpa_dense_tflops": fl_d / ms_d / 1e9,
            "sdpa_equal_work_ms": ms_c + ms_d, "sdpa_equal_work_tflops": (fl_c + fl_d) / (ms_c + ms_d) / 1e9,
            "ratio_vs_sdpa_equal_work": (ms_c + ms_d) / ms,
            "spot_rel_err": rel, "spot_lse_abs_err": lse_err,
            "first_block_ms": ms1, "first_block_tflops": fl1 / ms1 / 1e9,
            "score_ms": ms_score, "topk_ms": ms_topk, "select_gather_ms": ms_select,
            "score_select_ms": ms_all, "score_select_pct_of_attention": 100 * ms_all / ms,
            "merge_w4_ms": ms_merge,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del inp, q, kp, vp, ka, va, kb, vb, outs, lses, qq, sc, causal, dense
        torch.cuda.empty_cache()
    res["lengths"] = rows

    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)

    print()
    print(f"device: {name}; config {best}; bf16, hq={HQ}, hkv={HKV}, d={D}, batch 1")
    hdr = (f"{'L':>7} {'a':>5} {'n_pass':>6} | {'ours ms':>8} {'TF/s':>5} | {'SDPA c+d ms':>11} {'TF/s':>5} "
           f"{'ours/SDPA':>9} | {'SDPA causal TF/s':>16} | {'1st blk TF/s':>12} | {'score+sel ms':>12} {'%':>5} "
           f"| {'relerr':>7}")
    print(hdr)
    for r in rows:
        print(f"{r['L']:>7} {r['anchor']:>5} {r['n_pass']:>6} | {r['ours_ms']:>8.2f} {r['ours_tflops']:>5.0f} | "
              f"{r['sdpa_equal_work_ms']:>11.2f} {r['sdpa_equal_work_tflops']:>5.0f} "
              f"{r['ours_tflops'] / r['sdpa_equal_work_tflops']:>9.2f} | {r['sdpa_causal_tflops']:>16.0f} | "
              f"{r['first_block_tflops']:>12.0f} | {r['score_select_ms']:>12.3f} "
              f"{r['score_select_pct_of_attention']:>5.2f} | {r['spot_rel_err']:>7.1e}")
    if "gpu_tests" in res:
        print("gpu tests:", res["gpu_tests"]["summary"])
    print("wrote", out_path)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ours_tflops"] for r in rows], 0.4, label="apb_attention (Triton)")
        ax.bar([x + 0.2 for x in xs], [r["sdpa_equal_work_tflops"] for r in rows], 0.4,
               label="SDPA flash, equal work")
        ax.set_xticks(list(xs), [f"{r['L'] // 1024}K" for r in rows])
        ax.set_ylabel("TFLOP/s (visible pairs)")
        ax.set_title(f"APB-V attention, {name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_path.with_suffix(".png"), dpi=100)
    except Exception as exc:  # pragma: no cover
        print("no plot:", exc)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
