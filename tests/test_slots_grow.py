"""Continuous batching with the requests resolved when served: the slots start at the first request's size and
grow when a longer one joins, and the answers equal those of slots sized for every request from the start."""

from __future__ import annotations

import torch
from distributed_utils import single_process_groups

from megatron_apbv.inference.engine import Engine
from megatron_apbv.inference.prefill import apbv_prefill
from megatron_apbv.inference.slots import DecodeSlots
from megatron_apbv.models.resolve import load_config
from megatron_apbv.runtime.groups import context_parallel_group

CONFIG = "configs/tiny_cpu.yaml"
CPU = torch.device("cpu")
BASE = ["apbv.variant=exact", "model.init_std=0.3", "parallel.context_parallel_size=1", "generate.stop_ids=[]"]


def _decode(engine, runs, cfgs, capacity):
    """Every request decoded to its max_new_tokens; the short one joins first, the long one a chunk later."""
    slots = DecodeSlots(engine, runs[0], slots=2, capacity=capacity or runs[0].cache.capacity, cuda_graph=False,
                        group=context_parallel_group())
    slots.join(0, runs[0], cfgs[0].generate, seed=cfgs[0].seed, stop_ids=[])
    slots.run_chunk()
    if runs[1].cache.capacity > slots.capacity:
        slots.grow(runs[1].cache.capacity)
    grown = slots.capacity
    slots.join(1, runs[1], cfgs[1].generate, seed=cfgs[1].seed, stop_ids=[])
    done = {}
    while slots.active:
        slots.run_chunk()
        done.update({seq.key: seq.ids for seq in slots.release_finished()})
    return done, grown


def test_slots_grown_mid_decode_answer_as_slots_sized_up_front():
    cfgs = [load_config(CONFIG, BASE + ["input.video_frames=2", "generate.max_new_tokens=12"]),
            load_config(CONFIG, BASE + ["input.video_frames=6", "generate.max_new_tokens=9"])]
    with single_process_groups():
        engine = Engine.build(cfgs[0], CPU, vision=False)
        runs = [apbv_prefill(c, CPU, max_new_tokens=c.generate.max_new_tokens, engine=engine, barrier=False)
                for c in cfgs]
        assert runs[1].cache.capacity > runs[0].cache.capacity  # the second request needs the slots to grow
        grown, capacity = _decode(engine, runs, cfgs, None)
        sized, _ = _decode(engine, [apbv_prefill(c, CPU, max_new_tokens=c.generate.max_new_tokens, engine=engine,
                                                 barrier=False) for c in cfgs], cfgs, runs[1].cache.capacity)
    assert capacity == runs[1].cache.capacity
    assert [len(grown[0]), len(grown[1])] == [12, 9]
    assert grown == sized
    assert len(set(grown[0])) > 1  # a real answer, not one token repeated
