"""Megatron-core's ``HybridModel`` with our layer spec: the model class from megatron-core 0.18 on.

megatron-core 0.19 deprecates ``GPTModel`` in favour of ``HybridModel`` (docs/design.md §10), which exists
from 0.18.0. Two things of its stack do not fit our TE-free layer spec as they are:

* ``HybridStack`` always builds its final norm with Transformer Engine (``TENorm``), which is an optional
  dependency of ours; :class:`TorchNormHybridStack` builds Megatron's torch norm instead, as
  ``TransformerBlock`` does without Transformer Engine.
* The migration guide writes one GPT layer as two hybrid layers (``*-``: attention, then MLP), which
  numbers the attention layers 1, 3, 5, ...; our per-layer budgets and decode cache are indexed by layer
  number. One ``*`` per decoder layer, each our whole attention + MLP ``TransformerLayer``, keeps the layer
  numbers and every parameter name but the final norm's (``decoder.final_norm``).
"""

from __future__ import annotations

from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

FINAL_NORM = "decoder.final_norm"  # GPTModel: decoder.final_layernorm


class TorchNormHybridStack(HybridStack):
    """``HybridStack`` whose final norm is Megatron's torch norm (RMSNorm here), not Transformer Engine's."""

    def __init__(self, config, submodules, *, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, post_layer_norm=False, **kwargs)  # no TENorm built
        self.post_layer_norm = post_layer_norm  # forward applies final_norm when post_process and this
        if self.post_process and post_layer_norm:
            self.final_norm = WrappedTorchNorm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )


def hybrid_stack_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """The stack spec whose every ``*`` layer is ``layer_spec`` (a whole decoder layer)."""
    return ModuleSpec(module=TorchNormHybridStack, submodules=HybridStackSubmodules(attention_layer=layer_spec))


def hybrid_layer_pattern(num_layers: int) -> str:
    """One ``*`` per decoder layer (see the module docstring)."""
    return "*" * num_layers
