"""Distributed APB-V attention on W gloo ranks equals the single-process oracle, row for row."""

import itertools

import pytest
from distributed_utils import gathered_apbv_attention, run_on_ranks

from megatron_apbv.apbv.reference import (
    apbv_attention_reference,
    dense_attention_reference,
)

# (N, anchor, query): lengths divisible by neither 128 nor W; the last has a context shorter than 2W.
LENGTHS = [(103, 9, 5), (61, 0, 4), (14, 3, 3)]
GQA = [(4, 4), (8, 2)]  # (q heads, kv heads): ratios 1 and 4
BUDGETS = [0, 1, 3, None]  # None = exact (every key passed)
DIM = 16


def _cases():
    return list(itertools.product(LENGTHS, GQA, (True, False), BUDGETS, (True, False)))


def _worker(rank, world, seed):
    errors = []
    for case_id, ((n, a, q), (hq, hkv), zigzag, p, overlap) in enumerate(_cases()):
        passing = n if p is None else p
        Q, K, V, seq, outs = gathered_apbv_attention(rank, world, seed + case_id, n, a, q, hq, hkv, DIM, zigzag=zigzag,
                                                     passing_len=passing, window=5, overlap=overlap)
        if rank == 0:
            ref = apbv_attention_reference(
                Q, K, V, world_size=world, anchor_len=a, query_len=q, passing_len=passing, zigzag=zigzag, window=5
            )
            dense = dense_attention_reference(Q, K, V)
            for r, local in enumerate(outs):
                rows = seq.rank(r).global_indices
                rel = ((local - ref[rows]).norm() / ref[rows].norm()).item()
                exact_rel = ((local - dense[rows]).norm() / dense[rows].norm()).item()
                q_rows = slice(len(rows) - q, len(rows))
                q_rel = ((local[q_rows] - dense[rows][q_rows]).norm() / dense[rows][q_rows].norm()).item() if q else 0
                errors.append(dict(case=(n, a, q, hq, hkv, zigzag, p, overlap), rank=r, rel=rel,
                                   exact_rel=exact_rel, query_rel=q_rel))
    return errors


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_attention_matches_oracle(world):
    results = run_on_ranks(world, _worker, 100 * world)
    assert len(results) == len(_cases()) * world
    for r in results:
        assert r["rel"] <= 1e-5, r
        assert r["query_rel"] <= 1e-5, r  # query rows are exact whatever the budget
        if r["case"][6] is None:
            assert r["exact_rel"] <= 1e-5, r  # exact mode equals dense causal attention
