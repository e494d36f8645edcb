"""Distributed decoding: exact-mode generation equals dense single-process generation token for token."""

from pathlib import Path

import pytest
import torch
from distributed_utils import run_on_ranks

from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.inference.engine import Engine
from megatron_apbv.inference.generate import Sampler, apbv_generate
from megatron_apbv.models.gpt import build_gpt_model, build_rope, last_token_logits
from megatron_apbv.models.inputs import build_prompt
from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
from megatron_apbv.models.resolve import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def _worker(rank, world, overrides):
    cfg = load_config(CONFIG, overrides + [f"parallel.context_parallel_size={world}"])
    env, device = LaunchEnv(rank, world, rank), torch.device("cpu")
    init_distributed(cfg, env, device)
    try:
        return apbv_generate(cfg, device)
    finally:
        shutdown()


def _dense_generation(rank, world, overrides, steps):
    """Greedy decoding by re-running the dense model over the whole growing sequence (one process)."""
    cfg = load_config(CONFIG, overrides + ["parallel.context_parallel_size=1"])
    init_distributed(cfg, LaunchEnv(0, 1, 0), torch.device("cpu"))
    out = _dense_ids(cfg, steps)
    shutdown()
    return out


def _dense_ids(cfg, steps):
    prompt = build_prompt(cfg)
    model = build_gpt_model(cfg, method="dense", device=torch.device("cpu"))
    rope = build_rope(cfg, torch.device("cpu"))
    ids, pos = prompt.input_ids, prompt.position_ids
    out = []
    for _ in range(steps):
        token = last_token_logits(model, rope, ids, pos).argmax(-1)
        out.append(int(token[0]))
        ids = torch.cat([ids, token[:, None]], dim=1)
        pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_exact_mode_generation_equals_dense(world):
    overrides = ["apbv.variant=exact", "generate.max_new_tokens=16", "model.init_std=0.3"]
    record = run_on_ranks(world, _worker, overrides)
    dense = run_on_ranks(1, _dense_generation, overrides, 16)
    assert record["generated_ids"][0] == dense
    assert len(set(dense)) > 3  # the check is meaningful: the model does not repeat one token


def _batch_worker(rank, world, overrides, frames, new_tokens):
    """Each prompt prefilled on its own (one model), then all decoded together in one batch."""
    from megatron_apbv.inference.generate import generate_batch
    from megatron_apbv.inference.prefill import apbv_prefill

    runs, run = [], None
    for n in frames:
        cfg = load_config(CONFIG, overrides + [f"parallel.context_parallel_size={world}", f"input.video_frames={n}"])
        if run is None:
            init_distributed(cfg, LaunchEnv(rank, world, rank), torch.device("cpu"))
        engine = Engine.of(run) if run else None
        run = apbv_prefill(cfg, torch.device("cpu"), max_new_tokens=new_tokens, engine=engine)
        runs.append(run)
    try:
        batch = generate_batch(runs, cfg.generate, seed=cfg.seed, stop_ids=[], cuda_graphs=False)
        return batch.generated_ids, [r.seq.prompt_len for r in runs]
    finally:
        shutdown()


def _dense_generations(rank, world, overrides, frames, steps):
    cfgs = [load_config(CONFIG, overrides + ["parallel.context_parallel_size=1", f"input.video_frames={n}"])
            for n in frames]
    init_distributed(cfgs[0], LaunchEnv(0, 1, 0), torch.device("cpu"))
    try:
        return [_dense_ids(cfg, steps) for cfg in cfgs]
    finally:
        shutdown()


def test_batched_generation_of_different_prompt_lengths_equals_dense():
    overrides = ["apbv.variant=exact", "generate.max_new_tokens=8", "model.init_std=0.3"]
    frames = [12, 7, 4]
    dense = run_on_ranks(1, _dense_generations, overrides, frames, 8)
    for world in (2, 3):
        ids, lengths = run_on_ranks(world, _batch_worker, overrides, frames, 8)
        assert len(set(lengths)) == 3
        assert ids == dense, world


def test_cuda_graphs_on_the_cpu_is_a_config_error():
    from megatron_apbv.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="generate.cuda_graphs"):
        load_config(CONFIG, ["device=cpu", "generate.cuda_graphs=true"])


def test_caches_partition_the_sequence_and_only_the_tail_grows():
    from megatron_apbv.apbv.decode import DistributedKVCache

    cfg = load_config(CONFIG, ["parallel.context_parallel_size=3"])
    seq = SequenceLayout.from_config(cfg)
    rows = []
    for layout in seq.ranks():
        cache = DistributedKVCache(layout, max_new_tokens=5)
        rows.append(layout.global_indices[cache.cached_rows])
    owned = torch.cat(rows).sort().values
    assert torch.equal(owned, torch.arange(seq.prompt_len))  # every prompt token cached exactly once
    assert [DistributedKVCache(r, 5).is_tail for r in seq.ranks()] == [r.rank == seq.tail_rank for r in seq.ranks()]


def test_request_state_travels_in_its_own_context_not_in_the_mask():
    from dataclasses import fields

    from megatron_apbv.apbv.attention import APBVMask
    from megatron_apbv.apbv.decode import DecodeCache, DecodeStep, DistributedKVCache
    from megatron_apbv.apbv.inference_context import APBVInferenceContext

    # the mask is settings only: nothing a request owns (cache, step) is a field of it
    assert {f.name for f in fields(APBVMask)} == {"layout", "passing_lens", "window", "overlap", "selection"}
    cfg = load_config(CONFIG, ["parallel.context_parallel_size=2"])
    layout = SequenceLayout.from_config(cfg).rank(1)
    mask = APBVMask.from_config(cfg, layout)
    cache = DistributedKVCache(layout, max_new_tokens=3)
    prefill = APBVInferenceContext.prefill(mask, cache)
    assert prefill.mask is mask and prefill.prefill_cache is cache and not prefill.is_decode_only()
    k = torch.zeros(4, 1, 2, 8)
    step = DecodeStep.begin(DecodeCache({1: (k, k)}, torch.tensor([2], dtype=torch.int32),
                                        torch.tensor([1], dtype=torch.int32), world_size=2), new_tokens=1)
    assert step.visible.tolist() == [3]  # the tail sees its cached rows and the new token
    decode = APBVInferenceContext.decode(step)
    assert decode.is_decode_only() and decode.mask is None
    with pytest.raises(ValueError, match="exactly one"):
        APBVInferenceContext()
    with pytest.raises(ValueError, match="exactly one"):
        APBVInferenceContext(mask=mask, step=step)


def test_stop_ids_and_sampling_are_seeded():
    cfg = load_config(CONFIG, ["generate.temperature=0.8", "generate.top_p=0.9"])
    logits = torch.randn(2, 50)
    a = [Sampler(cfg.generate, 7)(logits) for _ in range(3)]
    b = [Sampler(cfg.generate, 7)(logits) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # top_p keeps only the head of the distribution
    peaked = torch.tensor([[10.0, 9.0, -10.0, -10.0]])
    cfg = load_config(CONFIG, ["generate.temperature=1.0", "generate.top_p=0.5"])
    assert {int(Sampler(cfg.generate, s)(peaked)) for s in range(20)} == {0}


def test_generation_stops_at_stop_id():
    first = run_on_ranks(2, _worker, ["generate.max_new_tokens=6"])["generated_ids"][0]
    stopped = run_on_ranks(2, _worker, ["generate.max_new_tokens=6", f"generate.stop_ids=[{first[2]}]"])
    assert stopped["generated_ids"][0] == first[: first.index(first[2]) + 1]
