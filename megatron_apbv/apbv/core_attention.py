"""What every core-attention module of this package shares: Megatron's constructor contract."""

from __future__ import annotations

import math
from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class CoreAttentionBase(MegatronModule):
    """Base of the ``core_attention`` submodules: takes the arguments Megatron's ``SelfAttention`` builds
    its core attention with, and keeps the layer number, the softmax scale and the context-parallel group
    (from ``pg_collection`` when Megatron passes one, else ``parallel_state``)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.softmax_scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp if cp is not None else parallel_state.get_context_parallel_group()

    def reject_bias_and_packing(self, name: str, attention_bias, packed_seq_params) -> None:
        """Megatron may pass an attention bias or packed-sequence parameters; no core attention here uses them."""
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(f"{name} supports neither attention_bias nor packed sequences")
