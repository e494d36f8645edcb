"""The attention methods, declared once: model building, ``apbv bench`` and the cost model ask here.

Each method names its Megatron core-attention class (whose ``rank_plan`` is the
method's layout and mask factory), the APB-V variant it runs and the settings that
variant fixes (the APB-V family shares one module and differs only in
configuration), whether it runs on one process, and its cost-model entries. Classes
and cost functions are named by import path and imported on first use: Ulysses
imports DeepSpeed, and the cost model (``apbv plan``) needs no torch.distributed at
all. Code elsewhere asks these entries; it never compares method names
(``tests/test_method_registry_use.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# The APB-V settings a variant does not fix take these values (``apbv.zigzag`` etc. left null).
APBV_DEFAULTS: Mapping[str, Any] = {"zigzag": True, "overlap": True, "passing": "auto"}


@dataclass(frozen=True)
class AttentionMethod:
    name: str
    summary: str
    core_attention: str  # "module:Class" of the core-attention submodule
    attention_cost: str  # "module:function" of the cost model's per-layer attention time
    cost_kernel: str  # which measured attention rate of the cost model's GPU profiles it runs at
    local_tokens: str  # "module:function" of the cost model's tokens per rank (n, world, seq) -> int
    variant: Optional[str] = None  # apbv.variant of the APB-V family; None for the baselines
    fixes: Mapping[str, Any] = field(default_factory=dict, hash=False)  # APB-V settings the variant fixes
    single_process: bool = False  # runs on one process with the whole prompt (dense)
    # the cost-model parameter a measured time of this method fits (profiles' facts; "{gpu}" filled in)
    fitted: Optional[str] = None
    takes_kernel: bool = False  # its core attention takes ``kernel=`` (the local attention: apbv bench --ulysses-kernel)

    def core_attention_class(self):
        """The core-attention class (imported now)."""
        return _resolve(self.core_attention)

    def cost_function(self):
        """The cost model's attention-time function of this method (imported now)."""
        return _resolve(self.attention_cost)

    def cost_local_tokens(self, n: int, world: int, seq=None) -> int:
        """The cost model's tokens per rank of an ``n``-token prompt on ``world`` ranks (``seq``: APB-V's layout)."""
        return _resolve(self.local_tokens)(n, world, seq)

    def setting(self, key: str):
        """APB-V setting ``key`` (zigzag, overlap, passing) as this variant runs it: fixed, else the default."""
        if self.variant is None:
            raise ValueError(f"method {self.name!r} is not an APB-V variant: it has no apbv.{key}")
        return self.fixes.get(key, APBV_DEFAULTS[key])

    def fixed_passing(self, prompt_len: int) -> Optional[int]:
        """The passing budget in tokens this variant fixes for a ``prompt_len``-token prompt, or None (free).

        ``all`` passes every key: the prompt length."""
        fixed = self.fixes.get("passing")
        return prompt_len if fixed == "all" else fixed

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

    def startup_note(self, device) -> Optional[str]:
        """What to print before this method first runs on ``device`` (a long start-up), or None."""
        return self.core_attention_class().startup_note(device)

    def attention_backend(self, cfg, rank: int, world: int, dtype, device):
        """``attention_backend`` of a record: which kernel route each part of ``rank``'s attention takes, as text."""
        return self.core_attention_class().attention_backend(self.config_for(cfg), rank, world, dtype, device)


_APBV = "megatron_apbv.apbv.attention:APBVCoreAttention"
_COST = "megatron_apbv.costmodel.attention:"


def _apbv_variant(name: str, summary: str, **fixes) -> AttentionMethod:
    return AttentionMethod(name, summary, _APBV, _COST + "apb_attention_cost", "apb", _COST + "apb_local_tokens",
                           variant=name, fixes=fixes)


METHODS: dict[str, AttentionMethod] = {
    m.name: m
    for m in (
        AttentionMethod("dense", "causal SDPA over the whole prompt on one process",
                        "megatron_apbv.baselines.dense:DenseCoreAttention", _COST + "dense_attention_cost", "sdpa",
                        _COST + "whole_prompt_tokens", single_process=True,
                        fitted="gpus.{gpu}.attention_tflops.sdpa"),
        AttentionMethod("ring", "exact zigzag ring attention",
                        "megatron_apbv.baselines.ring:RingCoreAttention", _COST + "ring_attention_cost", "sdpa",
                        _COST + "ring_local_tokens", fitted="software.ring_efficiency"),
        AttentionMethod("ulysses", "DeepSpeed-Ulysses all-to-all attention",
                        "megatron_apbv.baselines.ulysses:UlyssesCoreAttention", _COST + "ulysses_attention_cost",
                        "sdpa", _COST + "head_split_tokens", takes_kernel=True),
        _apbv_variant("apbv", "APB-V", zigzag=True, overlap=True),
        _apbv_variant("apb_like", "APB-V without zigzag and overlap (APB)", zigzag=False, overlap=False),
        _apbv_variant("star", "APB-V layout, no passing blocks (Star Attention)", passing=0),
        _apbv_variant("exact", "APB-V passing every key: equals dense", passing="all"),
    )
}
# apbv.variant -> the settings it fixes (the config's validation and the command line's replacement read it)
VARIANTS: dict[str, Mapping[str, Any]] = {m.variant: m.fixes for m in METHODS.values() if m.variant is not None}
# What `apbv bench` times and `apbv plan` predicts by default (exact equals dense by construction).
COMPARED = ("dense", "ring", "ulysses", "star", "apb_like", "apbv")
# Exact attention on one process: what the approximate methods' logits, accuracy and speed are compared with.
REFERENCE = "dense"
# The method the package serves (apbv run / generate / infer) and whose budgets `auto` ships.
SERVED = "apbv"


def get_method(name: str) -> AttentionMethod:
    """The method called ``name``; an error naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown attention method {name!r}: choose from {', '.join(METHODS)}") from None
