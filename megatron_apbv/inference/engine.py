"""The model a process serves: GPT model, RoPE and vision tower, built and loaded once.

``apbv run``/``apbv generate`` build one for their single prompt; ``apbv infer``
builds one from the job config and passes it, with each request's own config, to
:func:`~megatron_apbv.inference.generate.apbv_generate`. Nothing in it depends on
a prompt's length: the layout, budgets and KV cache are made per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import torch

from megatron_apbv.models.embeddings import build_vision_tower_for
from megatron_apbv.models.gpt import build_gpt_model, build_rope
from megatron_apbv.runtime.config import RunConfig
from megatron_apbv.runtime.timing import sync

T = TypeVar("T")


@dataclass
class Engine:
    model: torch.nn.Module  # the APB-V GPT model (weights from model.checkpoint, else seeded from cfg.seed)
    rope: torch.nn.Module
    tower: Optional[torch.nn.Module]  # the vision tower, when some prompt has real video frames
    device: torch.device
    build_timings: dict = field(default_factory=dict)  # build_seconds, load_seconds of the model

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, *, vision: Optional[bool] = None) -> "Engine":
        """Build from the job config; ``vision`` (default: ``input.kind == video``) also builds the tower."""
        vision = cfg.input.kind == "video" if vision is None else vision
        timings: dict = {}
        model = build_gpt_model(cfg, method="apbv", device=device, timings=timings)
        tower = build_vision_tower_for(cfg, device) if vision else None
        return cls(model, build_rope(cfg, device), tower, device, timings)

    @classmethod
    def of(cls, run) -> "Engine":
        """The engine an earlier :class:`~megatron_apbv.inference.prefill.Prefill` ran on (same model, no rebuild)."""
        return cls(run.model, run.rope, run.tower, run.logits.device)


def timed_stage(stages: dict[str, float], name: str, fn: Callable[[], T], device: torch.device) -> T:
    """``fn()``; adds its seconds (after the device finished) to ``stages[name]``."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
    return result
