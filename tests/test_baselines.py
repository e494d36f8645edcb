"""Benchmark baselines: zigzag ring attention and Ulysses all-to-all attention are exact.

Each runs on gloo ranks and is compared row by row with the single-process dense
causal reference (fp32 inputs, float64 reference), for lengths that do not
divide by ``2W``, GQA ratios 1 and 4, and prompts shorter than ``2W`` (empty
chunks, fully padded ranks). The whole Megatron model with ring (and Ulysses)
core attention gives the dense model's logits.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_on_ranks

from megatron_apbv.apbv.reference import dense_attention_reference
from megatron_apbv.baselines.ring import ring_layout
from megatron_apbv.baselines.ulysses import ContiguousLayout, kv_repeat_factor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SCALE = 0.3


def _global_qkv(n, b, hq, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, b, hq, d, generator=g), torch.randn(n, b, hkv, d, generator=g),
            torch.randn(n, b, hkv, d, generator=g))


def _dense(q, k, v):
    """Reference per batch element: ``[N, b, hq, d]``."""
    return torch.stack([dense_attention_reference(q[:, i], k[:, i], v[:, i], softmax_scale=SCALE)
                        for i in range(q.shape[1])], dim=1)


def _rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _gather(local: torch.Tensor, world: int) -> list[torch.Tensor]:
    """All ranks' local outputs (their lengths differ)."""
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    return gathered


# Cases: (N, batch, q heads, kv heads, dim). N = 37 and 50 divide by neither 2W = 4 nor 6; N = 5 < 2W
# leaves empty chunks on 3 ranks; GQA 1 (4/4) and 4 (8/2).
RING_CASES = [(37, 1, 4, 4, 8), (50, 2, 8, 2, 16), (5, 1, 8, 2, 8), (1, 1, 4, 4, 8)]


def _ring_errors(rank, world, cases):
    """Relative error of each case (rank 0; None elsewhere). W = 1 needs no process group."""
    from megatron_apbv.baselines.ring import ring_attention

    errors = []
    for n, b, hq, hkv, d in cases:
        q, k, v = _global_qkv(n, b, hq, hkv, d, seed=n + hq)
        seq = ring_layout(n, world)
        layout = seq.rank(rank)
        idx = layout.global_indices
        local = ring_attention(q[idx], k[idx], v[idx], layout, softmax_scale=SCALE, group=None)
        outs = _gather(local, world) if world > 1 else [local]
        if rank == 0:
            out = torch.empty_like(q)
            for r, part in enumerate(outs):
                out[seq.rank(r).global_indices] = part
            errors.append(_rel_err(out, _dense(q, k, v)))
    return errors


ULYSSES_CASES = {
    # (N, batch, q heads, kv heads, dim, local kernel): KV heads 2 and 1 on 2 ranks (1 is repeated),
    # 2 KV heads on 4 ranks (repeated), N = 5 on 4 ranks leaves a rank of padding only.
    2: [(37, 2, 8, 2, 8, "sdpa"), (21, 1, 4, 4, 16, "apb"), (9, 1, 4, 1, 8, "sdpa")],
    4: [(37, 1, 8, 2, 8, "sdpa"), (5, 1, 4, 4, 8, "apb")],
}


def _ulysses_errors(rank, world, cases):
    from megatron_apbv.baselines.ulysses import (
        ulysses_attention,
        ulysses_attention_module,
    )

    errors = []
    for n, b, hq, hkv, d, kernel in cases:
        q, k, v = _global_qkv(n, b, hq, hkv, d, seed=n + 7 * hq)
        layout = ContiguousLayout(n, world)
        idx = layout.padded_indices(rank)
        module = ulysses_attention_module(SCALE, dist.group.WORLD, kernel)
        local = ulysses_attention(q[idx], k[idx], v[idx], module, world)
        assert local.shape == (layout.chunk, b, hq, d)
        outs = _gather(local[: layout.real_len(rank)], world)
        if rank == 0:
            errors.append(_rel_err(torch.cat(outs), _dense(q, k, v)))
    return errors


def test_layouts_cover_the_prompt_once():
    for n in (1, 5, 37, 64):
        for world in (1, 2, 3, 4):
            ring = ring_layout(n, world)
            idx = torch.cat([ring.rank(r).global_indices for r in range(world)])
            assert sorted(idx.tolist()) == list(range(n))
            assert all(len(ring.rank(r).blocks) == 2 for r in range(world))
            flat = ContiguousLayout(n, world)
            real = torch.cat([flat.padded_indices(r)[: flat.real_len(r)] for r in range(world)])
            assert real.tolist() == list(range(n))
            assert sum(flat.real_len(r) for r in range(world)) == n
            assert flat.owner_of(n - 1) in [(r, flat.real_len(r) - 1) for r in range(world)]


def test_kv_repeat_factor():
    assert kv_repeat_factor(28, 4, 2) == 1
    assert kv_repeat_factor(28, 4, 7) == 7  # plain multi-head attention
    assert kv_repeat_factor(8, 2, 4) == 2
    with pytest.raises(ValueError, match="divide"):
        kv_repeat_factor(28, 4, 3)


MODEL_CASES = [
    ("ring", ["input.batch_size=2", "input.query_tokens=19"]),  # 467 tokens: uneven zigzag chunks
    ("ulysses", ["model.num_query_groups=1", "input.query_tokens=21"]),  # 1 KV head repeated; 469: padded
]


def _model_diffs(rank, world, cases):
    """Whole-model check (after the plain attention checks, in the same processes)."""
    from megatron_apbv.bench.benchmark import method_inputs, method_logits
    from megatron_apbv.models.gpt import build_gpt_model, build_rope, last_token_logits
    from megatron_apbv.models.inputs import build_prompt
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    env, device = LaunchEnv(rank, world, rank), torch.device("cpu")
    init_distributed(load_config(CONFIG, [f"parallel.context_parallel_size={world}"]), env, device)
    results = {}
    try:
        for method, overrides in cases:  # the groups only depend on the CP size: one start for every case
            cfg = load_config(CONFIG, overrides + [f"parallel.context_parallel_size={world}"])
            model, rope = build_gpt_model(cfg, method=method, device=device), build_rope(cfg, device)
            prompt = build_prompt(cfg)
            logits = method_logits(model, rope, method_inputs(method, cfg, prompt, rank, device))
            dense = build_gpt_model(cfg, method="dense", device=device)
            dense.load_state_dict(model.state_dict())
            ref = last_token_logits(dense, rope, prompt.input_ids, prompt.position_ids)
            results[method] = ((logits - ref).abs().max().item(), ref.abs().max().item())
        return results
    finally:
        shutdown()


def _worker(rank, world):
    """Everything that runs on ``world`` ranks, in one set of processes (each start imports Megatron)."""
    out = {}
    if world in RING_WORLDS:
        out["ring"] = _ring_errors(rank, world, RING_CASES)
    if world in ULYSSES_CASES:
        out["ulysses"] = _ulysses_errors(rank, world, ULYSSES_CASES[world])
    if world == MODEL_WORLD:
        out["model"] = _model_diffs(rank, world, MODEL_CASES)
    return out


RING_WORLDS, MODEL_WORLD = (2, 3), 2


@pytest.fixture(scope="module")
def on_ranks():
    cache = {}

    def results(world):
        if world not in cache:
            cache[world] = run_on_ranks(world, _worker)
        return cache[world]

    return results


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ring_attention_equals_dense(world, on_ranks):
    errors = _ring_errors(0, 1, RING_CASES) if world == 1 else on_ranks(world)["ring"]
    assert len(errors) == len(RING_CASES) and max(errors) <= 1e-5, errors


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_equals_dense(world, on_ranks):
    errors = on_ranks(world)["ulysses"]
    assert len(errors) == len(ULYSSES_CASES[world]) and max(errors) <= 1e-5, errors


def test_model_with_baseline_attention_gives_dense_logits(on_ranks):
    diffs = on_ranks(MODEL_WORLD)["model"]
    assert set(diffs) == {"ring", "ulysses"}
    for method, (diff, scale) in diffs.items():
        assert diff <= 1e-4 and scale > 0, (method, diff)
