"""Layer specs: Megatron's local GPT layer with the core attention swapped by configuration."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apbv.apbv.attention import APBVCoreAttention
from megatron_apbv.baselines.dense import DenseCoreAttention


def get_gpt_layer_apbv_spec(*, qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's local GPT layer spec (RMSNorm) whose core attention is APB-V (settings travel in the mask)."""
    return get_gpt_layer_spec_with(ModuleSpec(module=APBVCoreAttention), qk_layernorm)


def get_gpt_layer_dense_spec(*, qk_layernorm: bool = False) -> ModuleSpec:
    """The same layer with dense causal attention: the single-process baseline."""
    return get_gpt_layer_spec_with(ModuleSpec(module=DenseCoreAttention), qk_layernorm)


def get_gpt_layer_baseline_spec(method: str, *, qk_layernorm: bool = False) -> ModuleSpec:
    """The same layer with a sequence-parallel baseline: zigzag ``"ring"`` or all-to-all ``"ulysses"`` attention."""
    if method == "ring":
        from megatron_apbv.baselines.ring import RingCoreAttention as core
    elif method == "ulysses":
        from megatron_apbv.baselines.ulysses import (
            UlyssesCoreAttention as core,  # imports DeepSpeed: only on demand
        )
    else:
        raise ValueError(f"baseline method={method!r}: expected 'ring' or 'ulysses'")
    return get_gpt_layer_spec_with(ModuleSpec(module=core), qk_layernorm)


def get_gpt_layer_spec_with(core_attention: ModuleSpec, qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's local GPT layer spec (RMSNorm) with ``core_attention`` as its core attention."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec
