"""Benchmark APB-V's block attention against every SDPA backend of the GPU, on the same work, in one run.

    python benchmarks/bench_kernels.py --out $OUT/            # writes kernels_<gpu>.json

Work (Qwen2.5-VL-7B attention: 28 query / 4 KV heads, d 128, batch 1, bf16), per
block length L = 32K, 64K, 128K, with the paper's W = 2 defaults for a prompt of
N = 4L tokens (anchor a = roundup(N/64, 128), passing p = roundup(N/128, 128), the
last virtual block sees n_pass = 3p passing keys):

* ``block``: L block rows over ``[passing | anchor | block]`` (dense prefix, causal block);
* ``first_block``: the same plus the a anchor rows (causal over the anchor only);
* ``causal``: plain causal attention of L tokens.

Implementations timed on each:

* ours: ``triton`` (one fused kernel call), ``cudnn`` (our cuDNN route: two cuDNN
  calls merged by LSE, anchor rows on Triton, K/V expanded inside the timing) and
  ``routed`` (what ``apb_attention`` dispatches to by ``attention_routes``);
* SDPA with each backend (``default``, ``CUDNN_ATTENTION``, ``FLASH_ATTENTION``,
  ``EFFICIENT_ATTENTION``), GQA through ``enable_gqa`` where the backend takes it,
  else K/V expanded outside the timing, two ways: ``lower_right`` (one call with
  ``causal_lower_right`` over the concatenated keys: the complete block-row work;
  anchor rows a second, causal call) and ``split`` (a causal L x L call plus a
  dense L x prefix call, *without* the merge: SDPA returns no log-sum-exp, so this
  is not the complete work and favours SDPA).

TFLOP/s count visible pairs only (4 * d * hq * pairs). The ``summary`` compares
ours (routed) with the best SDPA way on the block work that produces the result
(``lower_right``), and also lists the best ``split`` as an upper bound. Further
rows: ours vs SDPA at head dims 64 / 80 / 96 (32K causal + prefix), the
Triton-vs-cuDNN crossover at L = 4K..16K (which sets ``attention_routes``), the
bf16 matmul ceiling, sampled-row fp32 spot checks, score + select cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from megatron_apbv.kernels import apb_attention as attn_mod  # noqa: E402
from megatron_apbv.kernels import passing_scores as passing_mod  # noqa: E402
from megatron_apbv.apbv import attention_routes  # noqa: E402
from megatron_apbv.apbv.attend import apb_attention  # noqa: E402
from megatron_apbv.apbv.cudnn_attention import cudnn_block_attention  # noqa: E402

HQ, HKV, D = 28, 4, 128
DT = torch.bfloat16
F = torch.nn.functional.scaled_dot_product_attention
BACKENDS = {
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def roundup(x, m):
    return (x + m - 1) // m * m


def workload(L):
    """(anchor, p, n_pass) of a block of L tokens: W = 2 defaults at N = 4L."""
    n = 4 * L
    a, p = roundup(n // 64, 128), roundup(n // 128, 128)
    return a, p, 3 * p


def timed(fn, target_ms=200.0):
    """Median milliseconds (CUDA events through do_bench), >= ~2 timed runs."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=max(1.0, est), rep=max(target_ms, 2 * est), return_mode="median")


def run_tests():
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_gpu.py"],
                          cwd=str(ROOT), capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-40:] if proc.stdout.strip() else []
    print("\n".join(tail), file=sys.stderr)
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "seconds": time.time() - t0,
            "output_tail": "\n".join(tail) + ("\n" + proc.stderr[-2000:] if proc.returncode else "")}


def matmul_ceiling():
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    return 2 * 8192 ** 3 / timed(lambda: a @ b, 300) / 1e9


def rand(*shape, gen):
    return torch.randn(shape, device="cuda", dtype=DT, generator=gen)


class Work:
    """Inputs of one work item, seq-first ([s, b, h, d]) for ours and [b, h, s, d] views for SDPA."""

    def __init__(self, L, n_pass, a, anchor_rows, d=D, hq=HQ, hkv=HKV):
        g = torch.Generator(device="cuda").manual_seed(L + anchor_rows + d)
        self.L, self.n_pass, self.a, self.ar, self.d, self.hq, self.hkv = L, n_pass, a, anchor_rows, d, hq, hkv
        self.q = rand(anchor_rows + L, 1, hq, d, gen=g)
        self.kp, self.vp = rand(n_pass, 1, hkv, d, gen=g), rand(n_pass, 1, hkv, d, gen=g)
        self.ka, self.va = rand(a, 1, hkv, d, gen=g), rand(a, 1, hkv, d, gen=g)
        self.kb, self.vb = rand(L, 1, hkv, d, gen=g), rand(L, 1, hkv, d, gen=g)
        self.scale = d ** -0.5

    @property
    def segs(self):
        return self.q, self.kp, self.vp, self.ka, self.va, self.kb, self.vb

    def flops(self):
        return 4 * self.d * self.hq * attn_mod.visible_pairs(self.ar + self.L, self.ar, self.n_pass, self.a, self.L)

    def ours(self, route):
        if route == "triton":
            return lambda: attn_mod.apb_attention_impl(*self.segs, anchor_rows=self.ar, softmax_scale=self.scale)
        if route == "cudnn":
            return lambda: cudnn_block_attention(attn_mod.apb_attention, *self.segs, anchor_rows=self.ar,
                                                 softmax_scale=self.scale)
        return lambda: apb_attention(*self.segs, anchor_rows=self.ar, softmax_scale=self.scale)

    def sdpa(self, backend, how):
        """A callable for SDPA ``backend`` doing this work ``how`` (lower_right / split), and its GQA mode."""
        bhsd = lambda t: t.permute(1, 2, 0, 3)  # noqa: E731
        q_anchor, q_block = bhsd(self.q[: self.ar]), bhsd(self.q[self.ar :])
        prefix_k, prefix_v = torch.cat([self.kp, self.ka]), torch.cat([self.vp, self.va])
        if how == "lower_right":
            calls = [(q_block, torch.cat([prefix_k, self.kb]), torch.cat([prefix_v, self.vb]), "lower_right")]
        else:
            calls = [(q_block, self.kb, self.vb, "causal")]
            if prefix_k.shape[0]:
                calls.append((q_block, prefix_k, prefix_v, "dense"))
        if self.ar:
            calls.append((q_anchor, self.ka, self.va, "causal"))

        def make(expand):
            prepared = []
            for q, k, v, mask in calls:
                k, v = bhsd(k), bhsd(v)
                if expand:
                    k = k.repeat_interleave(self.hq // self.hkv, 1)
                    v = v.repeat_interleave(self.hq // self.hkv, 1)
                prepared.append((q, k, v, mask))

            def run():
                outs = []
                with sdpa_kernel([BACKENDS[backend]]) if BACKENDS[backend] else contextlib.nullcontext():
                    for q, k, v, mask in prepared:
                        kw = {"enable_gqa": True} if not expand else {}
                        if mask == "lower_right":
                            kw["attn_mask"] = causal_lower_right(q.shape[2], k.shape[2])
                        outs.append(F(q, k, v, is_causal=mask == "causal", scale=self.scale, **kw))
                return outs
            return run

        for expand in (False, True):
            fn = make(expand)
            try:
                fn()
                torch.cuda.synchronize()
                return fn, "expanded_kv" if expand else "enable_gqa"
            except RuntimeError as exc:
                last = repr(exc)[:300]
        raise RuntimeError(last)


def spot_check(w: Work, out, lse, n_rows=48):
    """fp32 reference on sampled block rows."""
    L = w.L
    rows = torch.unique(torch.cat([torch.tensor([0, 1, 127, 128, L // 2, L - 1]), torch.randint(0, L, (n_rows,))]))
    rows = rows.cuda()
    keys = torch.cat([w.kp, w.ka, w.kb])[:, 0].float()
    vals = torch.cat([w.vp, w.va, w.vb])[:, 0].float()
    prefix = w.kp.shape[0] + w.ka.shape[0]
    g = w.hq // w.hkv
    qs = w.q[w.ar + rows, 0].float().view(len(rows), w.hkv, g, w.d)
    s = torch.einsum("rhgd,thd->hgrt", qs, keys) * w.scale
    t = torch.arange(keys.shape[0], device="cuda")
    s = s.masked_fill(~(t[None, :] < (prefix + rows[:, None] + 1)), float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.einsum("hgrt,thd->rhgd", torch.softmax(s, -1), vals).reshape(len(rows), w.hq, w.d)
    got = out[w.ar + rows, 0].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    lse_err = (lse[0][:, w.ar + rows].view(w.hkv, g, -1) - ref_lse).abs().max().item()
    return rel, lse_err


def measure(w: Work, *, ours=("triton", "cudnn", "routed"), sdpa=tuple(BACKENDS), ways=("lower_right", "split")):
    """TFLOP/s of every implementation on work ``w``."""
    flops = w.flops()
    row = {"L": w.L, "anchor_rows": w.ar, "n_pass": w.n_pass, "anchor": w.a, "d": w.d, "hq": w.hq, "hkv": w.hkv,
           "tflop": flops / 1e12}
    route = attention_routes.route_for(w.q.device, w.q.dtype, w.d, rows=w.ar + w.L, anchor_rows=w.ar,
                                       n_pass=w.n_pass, n_anchor=w.a, n_block=w.L)
    row["route"] = str(route)
    for name in ours:
        if name == "cudnn" and not attention_routes.cudnn_op_available():
            row["ours_cudnn_error"] = "no cuDNN attention op"
            continue
        try:
            fn = w.ours(name)
            out, lse = fn()
            torch.cuda.synchronize()
            if name == "routed":
                row["spot_rel_err"], row["spot_lse_abs_err"] = spot_check(w, out, lse)
            del out, lse
            ms = timed(fn)
            row[f"ours_{name}_ms"], row[f"ours_{name}_tflops"] = ms, flops / ms / 1e9
        except Exception as exc:  # recorded, not hidden: the row says what failed
            row[f"ours_{name}_error"] = repr(exc)[:300]
        torch.cuda.empty_cache()
    for backend in sdpa:
        for how in ways:
            key = f"sdpa_{backend}_{how}"
            try:
                fn, mode = w.sdpa(backend, how)
                ms = timed(fn)
                row[f"{key}_ms"], row[f"{key}_tflops"], row[f"{key}_gqa"] = ms, flops / ms / 1e9, mode
            except Exception as exc:
                row[f"{key}_error"] = repr(exc)[:300]
            torch.cuda.empty_cache()
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def probe_cudnn_op():
    """What the private cuDNN op returns here: LSE shape and units, and whether it takes GQA (hkv < hq) directly."""
    if not attention_routes.cudnn_op_available():
        return {"available": False}
    g = torch.Generator(device="cuda").manual_seed(0)
    q = rand(1, HQ, 1000, D, gen=g)
    k, v = rand(1, HKV, 1000, D, gen=g), rand(1, HKV, 1000, D, gen=g)
    ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    out, lse = op(q, ke, ve, None, True, 0.0, True, False, scale=D ** -0.5)[:2]
    s = (q.float() @ ke.float().transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.ones(1000, 1000, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    res = {"available": True, "lse_shape": list(lse.shape), "lse_stride": list(lse.stride()),
           "lse_dtype": str(lse.dtype), "out_stride": list(out.stride()),
           "lse_max_abs_err_natural_log": (lse.reshape(ref_lse.shape) - ref_lse).abs().max().item()}
    try:
        out_g = op(q, k, v, None, True, 0.0, True, False, scale=D ** -0.5)[0]
        res["native_gqa_max_abs_diff"] = (out_g.float() - out.float()).abs().max().item()
    except Exception as exc:
        res["native_gqa_error"] = repr(exc)[:300]
    return res


GQA_SHAPES = ((28, 4), (16, 2))  # (query heads, KV heads): Qwen2.5-VL-7B, -3B
ROUTES = ("triton", "cudnn")
NOISE = 0.03  # run-to-run spread of these timings (kernels/NOTES.md): "no slower" within it


def judge_route(row: dict) -> dict:
    """The head-dim row with the best measured route and whether the routed call is no slower than it."""
    measured = {r: row[f"ours_{r}_tflops"] for r in ROUTES if f"ours_{r}_tflops" in row}
    if measured:
        row["best_route"] = max(measured, key=measured.get)
        row["best_tflops"] = measured[row["best_route"]]
    routed = row.get("ours_routed_tflops")
    row["routed_no_slower_than_best"] = (routed is not None and bool(measured)
                                         and routed >= (1 - NOISE) * row["best_tflops"])
    return row


def route_table(rows: list[dict], device_name: str) -> dict:
    """``attention_routes_measured.json`` rebuilt from the head-dim rows (the other GPU generations kept).

    cuDNN is taken for a head dim when it was faster at every GQA ratio measured; the TFLOP/s of
    the 7B ratio are the table's numbers, every ratio's under ``tflops_by_gqa``.
    """
    gen = torch.cuda.get_device_capability()[0]
    table = json.loads(attention_routes.MEASURED_FILE.read_text())
    for d in sorted({r["d"] for r in rows}):
        mine = [r for r in rows if r["d"] == d and all(f"ours_{x}_tflops" in r for x in ROUTES)]
        if not mine:
            continue
        key = f"{gen}/{d}"
        entry = table.get(key, {})
        by_gqa = {f"{r['hq']}/{r['hkv']}": {x: round(r[f"ours_{x}_tflops"], 1) for x in ROUTES} for r in mine}
        first = by_gqa.get(f"{HQ}/{HKV}", next(iter(by_gqa.values())))
        cudnn_wins = all(v["cudnn"] > v["triton"] for v in by_gqa.values())
        tflops = dict(entry.get("tflops", {}))
        tflops[str(mine[0]["L"])] = first
        old_from = entry.get("cudnn_from_rows")
        entry.update({
            "device": device_name,
            "software": (f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
                         f"Triton {triton.__version__}"),
            "tflops": tflops, "tflops_by_gqa": by_gqa,
            "cudnn_from_rows": (min(old_from or mine[0]["L"], mine[0]["L"]) if cudnn_wins else None),
            "cudnn_native_gqa": entry.get("cudnn_native_gqa", False),
            "source": "bench_kernels.py head_dim_routes (kernels_gpu.json)",
        })
        table[key] = entry
    return table


def best(row, how):
    cands = [(row[f"sdpa_{b}_{how}_tflops"], b) for b in BACKENDS if f"sdpa_{b}_{how}_tflops" in row]
    return max(cands) if cands else (None, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output directory, or a .json path")
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--crossover", default="4096,8192,16384", help="block lengths for the Triton/cuDNN crossover")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--head-dims", default="64,80,96,128", help="head dims of the route rows (head_dim_routes)")
    ap.add_argument("--routes-out", default=None,
                    help="write the route table rebuilt from the head-dim rows here (attention_routes_measured.json)")
    args = ap.parse_args()

    name = torch.cuda.get_device_name()
    tag = "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()
    out_path = pathlib.Path(args.out)
    if out_path.suffix != ".json":
        out_path = out_path / f"kernels_{tag}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "capability": list(torch.cuda.get_device_capability()), "torch": torch.__version__,
           "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
           "shapes": {"hq": HQ, "hkv": HKV, "d": D, "batch": 1, "dtype": "bf16"},
           "route_table_in_use": {f"{k[0]}/{k[1]}": v for k, v in attention_routes.MEASURED.items()}}
    print(f"device {name}  torch {torch.__version__}  triton {triton.__version__}  cudnn {res['cudnn']}",
          file=sys.stderr, flush=True)

    def save():
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)

    if not args.no_tests:
        res["gpu_tests"] = run_tests()
        save()
    res["matmul_bf16_tflops"] = matmul_ceiling()
    res["cudnn_op_probe"] = probe_cudnn_op()
    print("cudnn op probe:", json.dumps(res["cudnn_op_probe"]), file=sys.stderr, flush=True)

    lengths = [int(x) for x in args.lengths.split(",") if x]
    res["block"], res["first_block"], res["causal"] = [], [], []
    for L in lengths:
        a, _, n_pass = workload(L)
        for key, w in (("block", Work(L, n_pass, a, 0)), ("first_block", Work(L, n_pass, a, a)),
                       ("causal", Work(L, 0, 0, 0))):
            res[key].append(measure(w))
            del w
            torch.cuda.empty_cache()
            save()

    # every head dim our models use, at both GQA ratios of Qwen2.5-VL (7B 28/4, 3B 16/2; 72B's 64/8 is the 3B
    # ratio): 32K block work, each of our routes, and the route table rebuilt from the measurement
    res["head_dim_routes"] = []
    for d in [int(x) for x in args.head_dims.split(",") if x]:
        for hq, hkv in GQA_SHAPES:
            a, _, n_pass = workload(32768)
            row = measure(Work(32768, n_pass, a, 0, d=d, hq=hq, hkv=hkv), sdpa=(), ways=())
            res["head_dim_routes"].append(judge_route(row))
            torch.cuda.empty_cache()
            # after every row: a run cut short by its time limit still leaves what it measured
            res["route_table"] = route_table(res["head_dim_routes"], name)
            if args.routes_out:
                pathlib.Path(args.routes_out).write_text(json.dumps(res["route_table"], indent=1) + "\n")
            save()

    # Triton vs cuDNN route on smaller blocks: where the route table switches
    res["crossover"] = []
    for L in [int(x) for x in args.crossover.split(",") if x]:
        a, _, n_pass = workload(L)
        res["crossover"].append(measure(Work(L, n_pass, a, 0), ours=("triton", "cudnn"), sdpa=()))
    ladder = sorted(res["crossover"] + res["block"], key=lambda r: r["L"])
    faster = [r["L"] for r in ladder if r.get("ours_cudnn_tflops", 0) > r.get("ours_triton_tflops", 0)]
    res["cudnn_faster_from_L"] = next((L for L in faster if all(x in faster for x in
                                                               [r["L"] for r in ladder if r["L"] >= L])), None)

    if not lengths:
        save()
        print(json.dumps({"out": str(out_path), "head_dim_routes": res["head_dim_routes"]}))
        return
    # the scoring + select step of one block (L = first length)
    L = lengths[0]
    kb = torch.randn(L, 1, HKV, D, device="cuda", dtype=DT)
    qq = torch.randn(128, 1, HQ, D, device="cuda", dtype=DT)
    p = workload(L)[1]
    res["score_select_ms"] = timed(lambda: passing_mod.select_passing(kb, kb, passing_mod.passing_scores(qq, kb, window=5), p))

    res["summary"] = []
    for r in res["block"]:
        lr, lr_b = best(r, "lower_right")
        sp, sp_b = best(r, "split")
        ours = r.get("ours_routed_tflops")
        res["summary"].append({
            "L": r["L"], "ours_tflops": ours, "ours_route": r["route"],
            "best_sdpa_tflops": lr, "best_sdpa_backend": lr_b, "ours_vs_best_sdpa": ours / lr if ours and lr else None,
            "best_sdpa_split_no_merge_tflops": sp, "best_sdpa_split_backend": sp_b,
            "ours_vs_split_no_merge": ours / sp if ours and sp else None,
            "ours_triton_tflops": r.get("ours_triton_tflops"), "ours_cudnn_tflops": r.get("ours_cudnn_tflops"),
        })
    save()

    print(f"\n{name}: APB-V block work (L block rows + prefix keys), TFLOP/s", file=sys.stderr)
    for s in res["summary"]:
        print(f"L={s['L']:>6}  ours {s['ours_tflops'] or 0:6.0f} ({s['ours_route']})  best SDPA "
              f"{s['best_sdpa_tflops'] or 0:6.0f} ({s['best_sdpa_backend']}, lower_right)  ratio "
              f"{s['ours_vs_best_sdpa'] or 0:.2f}  | SDPA split no merge {s['best_sdpa_split_no_merge_tflops'] or 0:6.0f} "
              f"({s['best_sdpa_split_backend']})  ratio {s['ours_vs_split_no_merge'] or 0:.2f}", file=sys.stderr)
    if "gpu_tests" in res:
        print("gpu tests:", res["gpu_tests"]["summary"], file=sys.stderr)
    print(json.dumps({"out": str(out_path), "summary": res["summary"]}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
