"""W = 8 on gloo CPU ranks: the whole model in exact mode equals dense, and APB-V attention equals the oracle.

Small inputs so that 8 processes on a 2-core machine stay well under a minute.
"""

from pathlib import Path

import torch
from distributed_utils import gathered_apbv_attention, run_on_ranks

from megatron_apbv.apbv.reference import (
    apbv_attention_reference,
    dense_attention_reference,
)
from megatron_apbv.inference.prefill import run_prefill
from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
from megatron_apbv.models.resolve import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
WORLD = 8
# 16 + 5 * 36 + 20 = 216 tokens: 16 virtual blocks of 10 or 11 tokens after a 32-token anchor
SMALL = ["input.video_frames=5", "model.num_layers=2"]


def _model_worker(rank, world, overrides):
    cfg = load_config(CONFIG, overrides + [f"parallel.context_parallel_size={world}"])
    env, device = LaunchEnv(rank, world, rank), torch.device("cpu")
    init_distributed(cfg, env, device)
    try:
        return run_prefill(cfg, env, device, compare="dense")
    finally:
        shutdown()


def test_exact_mode_logits_equal_dense_at_w8():
    record = run_on_ranks(WORLD, _model_worker, SMALL + ["apbv.variant=exact"])
    assert record["world_size"] == WORLD and len(record["block_lens"]) == 2 * WORLD
    assert record["max_abs_logit_diff"] <= 1e-4, record
    assert record["top1_agree"] and record["rank_logit_spread"] == 0.0, record
    assert abs(record["kl"]) < 1e-8


# (N, anchor, query, q heads, kv heads, passing, zigzag): uneven blocks, GQA 4, the context shorter than 2W.
CASES = [(211, 13, 7, 8, 2, 3, True), (211, 13, 7, 8, 2, 2, False), (22, 3, 2, 4, 4, 1, True)]
DIM = 16


def _attention_worker(rank, world, seed):
    results = []
    for i, (n, a, q, hq, hkv, p, zigzag) in enumerate(CASES):
        Q, K, V, seq, outs = gathered_apbv_attention(rank, world, seed + i, n, a, q, hq, hkv, DIM, zigzag=zigzag,
                                                     passing_len=p, window=5, overlap=zigzag)
        if rank == 0:
            ref = apbv_attention_reference(Q, K, V, world_size=world, anchor_len=a, query_len=q, passing_len=p,
                                           zigzag=zigzag, window=5)
            dense = dense_attention_reference(Q, K, V)
            glob = seq.scatter_back(outs)
            results.append(dict(
                case=CASES[i],
                rel=((glob - ref).norm() / ref.norm()).item(),
                per_rank=max(((o - ref[seq.rank(r).global_indices]).abs().max()).item() for r, o in enumerate(outs)),
                query_rel=((glob[n - q:] - dense[n - q:]).norm() / dense[n - q:].norm()).item(),
                dense_rel=((glob - dense).norm() / dense.norm()).item(),
            ))
    return results


def test_apbv_attention_matches_oracle_at_w8():
    results = run_on_ranks(WORLD, _attention_worker, 800)
    assert len(results) == len(CASES)
    for r in results:
        assert r["rel"] <= 1e-5 and r["per_rank"] <= 1e-4, r
        assert r["query_rel"] <= 1e-5, r  # query rows exact whatever the budget
    assert results[0]["dense_rel"] > 1e-3  # a real approximation, not exact by accident
