"""The attention methods, declared once: model building, ``apbv bench`` and the cost model ask here.

Each method names its Megatron core-attention class (whose ``rank_plan`` is the
method's layout and mask factory), the APB-V variant it runs (the APB-V family
shares one module and differs only in configuration), whether it runs on one
process, and its cost-model entry. Classes and cost functions are named by
import path and imported on first use: Ulysses imports DeepSpeed, and the cost
model (``apbv plan``) needs no torch.distributed at all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class AttentionMethod:
    name: str
    summary: str
    core_attention: str  # "module:Class" of the core-attention submodule
    attention_cost: str  # "module:function" of the cost model's per-layer attention time
    cost_kernel: str  # which measured attention rate of the cost model's GPU profiles it runs at
    variant: Optional[str] = None  # apbv.variant of the APB-V family; None for the baselines
    single_process: bool = False  # runs on one process with the whole prompt (dense)

    def core_attention_class(self):
        """The core-attention class (imported now)."""
        return _resolve(self.core_attention)

    def cost_function(self):
        """The cost model's attention-time function of this method (imported now)."""
        return _resolve(self.attention_cost)

    def config_for(self, cfg):
        """``cfg`` with this method's APB-V variant applied (the settings it fixes replaced); baselines: ``cfg``."""
        if self.variant is None or cfg.apbv.variant == self.variant:
            return cfg
        from megatron_apbv.runtime.config import RunConfig, without_variant_settings

        data = cfg.model_dump()
        data["apbv"] = {**without_variant_settings(data["apbv"], self.variant), "variant": self.variant}
        return RunConfig.model_validate(data)

    def layer_spec(self, **params):
        """Megatron's local GPT layer spec with this method's core attention (``params`` go to its constructor)."""
        from megatron.core.transformer.spec_utils import ModuleSpec

        from megatron_apbv.apbv.spec import get_gpt_layer_spec_with

        return get_gpt_layer_spec_with(ModuleSpec(module=self.core_attention_class(), params=params))

    def rank_plan(self, cfg, rank: int, world: int):
        """What ``rank`` of ``world`` holds under this method for ``cfg``'s prompt (a ``RankPlan``)."""
        return self.core_attention_class().rank_plan(self.config_for(cfg), rank, world)

    def unsupported(self, cfg, world: int) -> Optional[str]:
        """Why this method cannot run ``cfg``'s shape on ``world`` ranks (the same answer on every rank), or None."""
        return self.core_attention_class().unsupported(cfg, world)


_APBV = "megatron_apbv.apbv.attention:APBVCoreAttention"
_APB_COST = "megatron_apbv.costmodel.attention:apb_attention_cost"

METHODS: dict[str, AttentionMethod] = {
    m.name: m
    for m in (
        AttentionMethod("dense", "causal SDPA over the whole prompt on one process",
                        "megatron_apbv.baselines.dense:DenseCoreAttention",
                        "megatron_apbv.costmodel.attention:dense_attention_cost", "sdpa", single_process=True),
        AttentionMethod("ring", "exact zigzag ring attention",
                        "megatron_apbv.baselines.ring:RingCoreAttention",
                        "megatron_apbv.costmodel.attention:ring_attention_cost", "sdpa"),
        AttentionMethod("ulysses", "DeepSpeed-Ulysses all-to-all attention",
                        "megatron_apbv.baselines.ulysses:UlyssesCoreAttention",
                        "megatron_apbv.costmodel.attention:ulysses_attention_cost", "sdpa"),
        AttentionMethod("star", "APB-V layout, no passing blocks (Star Attention)", _APBV, _APB_COST, "apb", variant="star"),
        AttentionMethod("apb_like", "APB-V without zigzag and overlap (APB)", _APBV, _APB_COST, "apb", variant="apb_like"),
        AttentionMethod("apbv", "APB-V", _APBV, _APB_COST, "apb", variant="apbv"),
        AttentionMethod("exact", "APB-V passing every key: equals dense", _APBV, _APB_COST, "apb", variant="exact"),
    )
}
# What `apbv bench` times and `apbv plan` predicts by default (exact equals dense by construction).
COMPARED = ("dense", "ring", "ulysses", "star", "apb_like", "apbv")


def get_method(name: str) -> AttentionMethod:
    """The method called ``name``; an error naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown attention method {name!r}: choose from {', '.join(METHODS)}") from None
