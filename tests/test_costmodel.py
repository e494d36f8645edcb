"""Cost model: pair counts against explicit masks, monotonicity, calibration, `apbv plan`."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.apbv.reference import apbv_mask_reference
from megatron_apbv.costmodel.attention import apb_attention_cost
from megatron_apbv.costmodel.calibration import Point, Profiles, _fit_scalar, calibrate
from megatron_apbv.costmodel.pairs import apbv_pairs, causal_pairs, ring_pair_matrix
from megatron_apbv.costmodel.predict import predict
from megatron_apbv.costmodel.shapes import ModelShape
from megatron_apbv.methods import COMPARED as METHODS

ROOT = Path(__file__).resolve().parents[1]
QWEN = ModelShape(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, ffn=18944, vocab=152064)


@pytest.fixture(scope="module")
def calibration():
    return calibrate(results_dir=ROOT / "benchmarks" / "results")


def _cluster(gpus, interconnect="nvlink", gpu="h100", per_node=8, profiles=None):
    return (profiles or Profiles.load()).cluster(gpu, interconnect, gpus, per_node)


# ---------------------------------------------------------------- pair counts vs masks


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(4, 70), world=st.integers(1, 5), zigzag=st.booleans(), p=st.integers(0, 9),
    a_frac=st.floats(0, 0.3), q_frac=st.floats(0, 0.3), kv=st.sampled_from([1, 2]),
)
def test_apbv_pairs_equal_the_explicit_mask(n, world, zigzag, p, a_frac, q_frac, kv):
    a, q = int(n * a_frac), int(n * q_frac)
    g = torch.Generator().manual_seed(n * 31 + world)
    Q, K = torch.randn(n, 2 * kv, 8, generator=g), torch.randn(n, kv, 8, generator=g)
    mask = apbv_mask_reference(Q, K, world_size=world, anchor_len=a, query_len=q, passing_len=p, zigzag=zigzag)
    seq = SequenceLayout(n, a, q, world, zigzag=zigzag)
    pairs = apbv_pairs(seq, p)
    for h in range(kv):
        m = mask[h]
        assert pairs[0].anchor == int(m[:a].sum())
        for r, rp in enumerate(pairs):
            rows = [i for _, span in seq.rank(r).blocks for i in range(span.start, span.stop)]
            assert rp.first + rp.second == int(m[rows].sum())
            assert rp.anchor == pairs[0].anchor  # every rank recomputes the anchor rows
        # the query rows are split over the ranks: together they are exactly Q's rows of the mask
        assert sum(rp.query for rp in pairs) == int(m[n - q:].sum())
        # so one anchor, every block and every query share cover the whole mask
        assert pairs[0].anchor + sum(rp.first + rp.second + rp.query for rp in pairs) == int(m.sum())


@pytest.mark.parametrize("n, world", [(1, 1), (7, 1), (13, 2), (40, 3), (5, 4), (67, 8)])
def test_ring_pairs_equal_the_causal_mask(n, world):
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    seq = SequenceLayout(n, 0, 0, world, zigzag=True)
    R = ring_pair_matrix(n, world)
    idx = [seq.rank(r).global_indices for r in range(world)]
    for r in range(world):
        for s in range(world):
            assert R[r, s] == int(causal[idx[r]][:, idx[s]].sum())
    assert R.sum() == causal_pairs(n)


def test_exact_mode_counts_dense_pairs_and_flops():
    seq = SequenceLayout(1000, 64, 16, 4)
    pairs = apbv_pairs(seq, 10**9)
    assert pairs[0].anchor + sum(p.first + p.second + p.query for p in pairs) == causal_pairs(1000)
    shape = ModelShape.attention(28, 4, 128)
    dense = predict("dense", shape, _cluster(1), 4096)
    assert dense.attention_tflop_per_rank * 1e12 == pytest.approx(4 * 128 * 28 * causal_pairs(4096))


def test_linear_flops_count_the_redundant_anchor_and_query():
    n, a, q, w = 65536, 1024, 64, 8
    ring = predict("ring", QWEN, _cluster(w), n)
    apbv = predict("apbv", QWEN, _cluster(w), n, anchor_len=a, query_len=q, passing=512)
    params = QWEN.layer_params
    assert ring.linear_tflop_per_rank * 1e12 == pytest.approx(28 * 2 * params * n / w)
    local = a + q + max(sum(SequenceLayout(n, a, q, w).rank(r).block_lens) for r in range(w))
    assert apbv.local_tokens == local
    assert apbv.linear_tflop_per_rank * 1e12 == pytest.approx(28 * 2 * params * local)


# ---------------------------------------------------------------- monotonicity


@pytest.mark.parametrize("method", ["ring", "ulysses", "apbv", "apb_like", "star"])
def test_more_gpus_less_attention_compute_per_rank(method):
    n, flops = 131072, []
    for w in (1, 2, 4, 7, 14, 28):
        r = predict(method, QWEN, _cluster(w), n, anchor_len=2048, query_len=64, passing=1024)
        assert r.feasible, r.reason
        flops.append(r.attention_tflop_per_rank)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(flops, flops[1:])), flops
    assert flops[-1] < flops[0] / 4


def test_larger_passing_budget_more_bytes_and_time():
    w, n = 16, 262144
    prev_bytes = prev_time = -1.0
    for p in (0, 256, 1024, 2048, 4096):
        r = predict("apbv", QWEN, _cluster(w, "ib"), n, anchor_len=4096, query_len=64, passing=p)
        assert r.comm_gb_per_rank > prev_bytes and r.seconds > prev_time
        prev_bytes, prev_time = r.comm_gb_per_rank, r.seconds


def test_slower_links_never_faster():
    for method in ("ring", "apbv", "apb_like"):
        times = [predict(method, QWEN, _cluster(64, link), 1 << 20, anchor_len=16384, query_len=64,
                         passing=8192).seconds for link in ("nvlink", "ib", "ib4", "ethernet")]
        assert times == sorted(times), (method, times)


def test_overlap_rules():
    shape = ModelShape.attention(28, 4, 128)
    seq_z, seq = SequenceLayout(131072, 2048, 64, 16), SequenceLayout(131072, 2048, 64, 16, zigzag=False)
    cl = _cluster(16, "ib")
    over = apb_attention_cost(shape, cl, seq_z.prompt_len, seq_z, 1024, method="apbv")
    serial = apb_attention_cost(shape, cl, seq.prompt_len, seq, 1024, method="apb_like")
    assert over.compute_s <= over.seconds <= over.compute_s + over.comm_s + 1e-12  # max-like: hidden at least partly
    assert serial.seconds >= serial.compute_s + serial.comm_s - 1e-12  # sum: nothing hidden
    ring = predict("ring", shape, cl, 131072)
    assert ring.attention_ms >= ring.attention_compute_ms - 1e-9


def test_ulysses_infeasible_when_heads_do_not_split():
    r = predict("ulysses", QWEN, _cluster(8), 131072)
    assert not r.feasible and "28" in r.reason and r.seconds is None
    assert predict("ulysses", QWEN, _cluster(4), 131072).feasible


# ---------------------------------------------------------------- calibration


def test_fit_scalar_recovers_a_rate():
    flops = [1e12, 4e12, 1.6e13]
    points = [Point(f"p{i}", "gpus.h100.matmul_tflops", f / 500e12, lambda p, f=f: f / (p.get("gpus.h100.matmul_tflops") * 1e12))
              for i, f in enumerate(flops)]
    cal = calibrate(Profiles.load(), points)
    assert cal.fitted["gpus.h100.matmul_tflops"] == pytest.approx(500.0, rel=1e-6)
    assert cal.max_abs_error_pct < 1e-4
    assert _fit_scalar(lambda x: (math.log(x) - math.log(3.0)) ** 2, 0.01, 100) == pytest.approx(3.0, rel=1e-6)


def test_calibration_reproduces_the_measured_points(calibration):
    rows = [r for r in calibration.rows if r["used_in_fit"]]
    assert len(rows) >= 10  # the kernel benchmark files are in the repository
    for r in rows:
        assert abs(r["error_pct"]) <= calibration.max_abs_error_pct + 1e-9
        assert r["predicted_ms"] == pytest.approx(r["measured_ms"], rel=calibration.max_abs_error_pct / 100 + 1e-9)
    assert calibration.max_abs_error_pct < 10.0
    by_name = {r["point"]: r for r in calibration.rows}
    h200 = [r for name, r in by_name.items() if "H200" in name]
    assert len(h200) == 2 and all(abs(r["error_pct"]) < 1.0 for r in h200)  # 217 ms dense, 124 ms ring
    fitted = calibration.fitted
    assert 450 < fitted["gpus.h100.attention_tflops.apb"] < 550  # ~500 TFLOP/s (kernels/NOTES.md)
    assert 300 < fitted["gpus.h100.attention_tflops.sdpa"] < 380  # ~340 TFLOP/s
    assert 0.5 < fitted["software.ring_efficiency"] < 1.0
    # fits without an H200 measurement are copied from the H100
    assert calibration.profiles.get("gpus.h200.attention_tflops.apb") == fitted["gpus.h100.attention_tflops.apb"]


def test_calibrated_dense_and_ring_points_on_h200(calibration):
    shape = ModelShape.attention(28, 4, 128)
    prof = calibration.profiles
    dense = predict("dense", shape, prof.cluster("h200", "nvlink", 1), 131072).seconds
    ring = predict("ring", shape, prof.cluster("h200", "nvlink", 2), 131072).seconds
    assert dense == pytest.approx(0.217, rel=0.01) and ring == pytest.approx(0.124, rel=0.01)


# ---------------------------------------------------------------- apbv plan


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "megatron_apbv", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plan_cli_prints_valid_json():
    out = _plan("configs/tiny_cpu.yaml", "--gpus", "8")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["gpus"] == 8 and set(record["methods"]) == set(METHODS)
    assert record["fastest"] in METHODS and record["methods"][record["fastest"]]["feasible"]
    assert "time model, not an accuracy model" in record["note"]
    assert "method" in out.stderr and "NOTE" in out.stderr  # the readable table


def test_plan_respects_the_floors_and_overrides():
    qwen = ["model.num_layers=28", "model.hidden_size=3584", "model.num_attention_heads=28",
            "model.num_query_groups=4", "model.ffn_hidden_size=18944", "model.vocab_size=152064", "dtype=bfloat16"]
    out = _plan("configs/tiny_cpu.yaml", *qwen, "--gpus", "8", "--tokens", "131072")
    record = json.loads(out.stdout)
    b = record["best_budget"]
    assert b["anchor"] >= 131072 / 64 and b["passing"] >= 131072 / 128
    # time is monotone in the budgets, so the choice is the floor itself
    assert (b["anchor"], b["passing"]) == (2048, 1024)
    out = _plan("configs/tiny_cpu.yaml", *qwen, "--gpus", "8", "--tokens", "131072", "--min-anchor", "0",
                "--min-passing", "0", "--interconnect", "ethernet", "--gpu", "h200")
    record = json.loads(out.stdout)
    assert (record["best_budget"]["anchor"], record["best_budget"]["passing"]) == (512, 256)
    assert record["interconnect"] == "ethernet" and record["gpu"] == "h200"


def test_plan_rejects_unknown_profiles():
    out = _plan("configs/tiny_cpu.yaml", "--gpus", "4", "--interconnect", "carrier-pigeon")
    assert out.returncode == 2 and "carrier-pigeon" in out.stderr
