"""Layer specs: Megatron's local GPT layer with its core attention chosen by configuration (no patching)."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apbv.apbv.attention import APBVCoreAttention


def get_gpt_layer_apbv_spec(*, qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's local GPT layer spec (RMSNorm) whose core attention is APB-V (settings travel in the mask)."""
    return get_gpt_layer_spec_with(ModuleSpec(module=APBVCoreAttention), qk_layernorm)


def get_gpt_layer_spec_with(core_attention: ModuleSpec, qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's local GPT layer spec (RMSNorm) with ``core_attention`` as its core attention."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec
