"""Passing-selection rules (issue 19): the distributed layer equals the explicit-mask oracle of the same rule."""

import itertools

import pytest
import torch
from distributed_utils import gathered_apbv_attention, run_on_ranks

from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.apbv.reference import (
    apbv_attention_reference,
    apbv_block_bounds_reference,
    apbv_passing_selection_reference,
)
from megatron_apbv.apbv.selection import SELECTION_RULES, SelectionRule, rule_scores, select_passing

DIM = 16
LENGTHS = [(103, 9, 5)]
GQA = [(4, 4), (8, 2)]
BUDGETS = [1, 13]
FRAME = dict(frame_start=3, frame_len=4)


def _rule(name):
    return SelectionRule(name, recent_fraction=0.5, **FRAME)


def _ref_opts(name):
    return dict(selection=name, recent_fraction=0.5, **FRAME)


def _cases():
    return list(itertools.product(SELECTION_RULES, LENGTHS, GQA, BUDGETS))


def _worker(rank, world, seed):
    errors = []
    for case_id, (rule, (n, a, q), (hq, hkv), p) in enumerate(_cases()):
        Q, K, V, seq, outs = gathered_apbv_attention(rank, world, seed + case_id, n, a, q, hq, hkv, DIM, zigzag=True,
                                                     passing_len=p, window=3, overlap=True, selection=_rule(rule))
        if rank == 0:
            ref = apbv_attention_reference(Q, K, V, world_size=world, anchor_len=a, query_len=q, passing_len=p,
                                           window=3, softmax_scale=DIM ** -0.5, **_ref_opts(rule))
            for r, local in enumerate(outs):
                rows = seq.rank(r).global_indices
                rel = ((local - ref[rows]).norm() / ref[rows].norm()).item()
                errors.append(dict(case=(rule, n, a, q, hq, hkv, p), rank=r, rel=rel))
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_rules_distributed_match_oracle(world):
    results = run_on_ranks(world, _worker, 700 + world)
    assert len(results) == len(_cases()) * world
    for r in results:
        assert r["rel"] <= 1e-5, r


@pytest.mark.parametrize("rule", SELECTION_RULES)
def test_rule_selects_oracle_keys_and_exactly_p(rule):
    """Per block and KV head: exactly min(p, L) keys, the oracle's set, on one block of positions."""
    n, a, q, w, p, hq, hkv = 90, 5, 6, 2, 7, 8, 2
    g = torch.Generator().manual_seed(11)
    Q, K = torch.randn(n, hq, DIM, generator=g), torch.randn(n, hkv, DIM, generator=g)
    sels = apbv_passing_selection_reference(Q, K, world_size=w, anchor_len=a, query_len=q, passing_len=p,
                                            window=3, softmax_scale=DIM ** -0.5, **_ref_opts(rule))
    for (start, end), sel in zip(apbv_block_bounds_reference(n, world_size=w, anchor_len=a, query_len=q), sels):
        assert sel.shape == (hkv, min(p, end - start))
        assert all(len(set(row.tolist())) == sel.shape[1] for row in sel)  # distinct keys
        positions = torch.arange(start, end, dtype=torch.float32)[:, None, None, None].expand(-1, 1, hkv, DIM)
        scores = rule_scores(Q[n - q:, None], K[start:end, None], _rule(rule), window=3, passing_len=p,
                             block_start=start, softmax_scale=DIM ** -0.5)
        got, _ = select_passing(positions, positions, scores, p)
        got = got[:, 0, :, 0].long().T.sort(dim=-1).values
        assert torch.equal(got, sel), (rule, start, got, sel)


def test_recent_reserves_the_block_end_and_frame_passes_whole_frames():
    n, a, q, p = 70, 2, 4, 8
    g = torch.Generator().manual_seed(5)
    Q, K = torch.randn(n, 4, DIM, generator=g), torch.randn(n, 2, DIM, generator=g)
    common = dict(world_size=1, anchor_len=a, query_len=q, passing_len=p, window=1)
    bounds = apbv_block_bounds_reference(n, world_size=1, anchor_len=a, query_len=q)
    recent = apbv_passing_selection_reference(Q, K, selection="recent", recent_fraction=0.5, **common)
    for (start, end), sel in zip(bounds, recent):
        for row in sel.tolist():
            assert set(range(end - 4, end)) <= set(row)  # floor(0.5 * 8) = 4 last keys
    frame = apbv_passing_selection_reference(Q, K, selection="frame", frame_start=2, frame_len=4, **common)
    for sel in frame:
        for row in sel.tolist():
            frames = {(t - 2) // 4 for t in row}
            assert len(frames) == 2 and all(sum((t - 2) // 4 == f for t in row) == 4 for f in frames)
    mean = apbv_passing_selection_reference(Q, K, **common)
    assert any(not torch.equal(x, y) for x, y in zip(mean, recent))


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="selection rule"):
        SelectionRule("best")
    with pytest.raises(ValueError, match="selection must be one of"):
        apbv_passing_selection_reference(torch.randn(9, 2, 4), torch.randn(9, 1, 4), world_size=1, anchor_len=0,
                                         query_len=2, passing_len=1, selection="best")


def test_config_selects_the_rule_with_the_frame_grid():
    from megatron_apbv.apbv.attention import APBVMask
    from megatron_apbv.runtime.config import ConfigError
    from megatron_apbv.models.resolve import load_config

    cfg = load_config("configs/needle.yaml", ["apbv.selection=frame"])
    layout = SequenceLayout(cfg.prompt_len, cfg.anchor_len, cfg.query_len, 2).rank(0)
    assert APBVMask.from_config(cfg, layout).selection == SelectionRule("frame", frame_start=16, frame_len=24)
    assert load_config("configs/needle.yaml").apbv.selection == "mean"  # the paper's rule stays the default
    with pytest.raises(ConfigError, match="selection"):
        load_config("configs/needle.yaml", ["apbv.selection=best"])
    with pytest.raises(ConfigError, match="apbv.selection=frame needs input.kind"):
        SelectionRule.from_config(load_config(None, ["apbv.selection=frame", "input.kind=video", "apbv.anchor=8"]))
