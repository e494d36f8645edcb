"""What every core-attention module of this package shares: Megatron's constructor contract."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass(frozen=True)
class RankPlan:
    """What one rank holds of a prompt under a method: its rows, its ``attention_mask``, where the last token is."""

    indices: Optional[torch.Tensor]  # global token index of each local row; None: this rank holds nothing
    mask: object  # the core attention's attention_mask
    last_owner: Optional[int]  # CP rank holding the prompt's last token (None: every rank holds it)
    last_row: int  # its local row there


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
        self.cp_size = torch.distributed.get_world_size(self.cp_group) if self.cp_group is not None else 1

    def reject_bias_and_packing(self, name: str, attention_bias, packed_seq_params) -> None:
        """Megatron may pass an attention bias or packed-sequence parameters; no core attention here uses them."""
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(f"{name} supports neither attention_bias nor packed sequences")

    @classmethod
    def rank_plan(cls, cfg, rank: int, world: int) -> RankPlan:
        """The method's layout and mask of ``cfg``'s prompt on ``rank`` of ``world`` (each method defines it)."""
        raise NotImplementedError(f"{cls.__name__} does not define its rank layout")

    @classmethod
    def unsupported(cls, cfg, world: int) -> Optional[str]:
        """Why this attention cannot run ``cfg``'s shape on ``world`` ranks, or None (the default)."""
        return None

    @classmethod
    def attention_backend(cls, cfg, rank: int, world: int, dtype: torch.dtype, device: torch.device):
        """Which kernel route each part of ``rank``'s attention takes on ``device`` (text, for records), or None."""
        return None

    @classmethod
    def startup_note(cls, device: torch.device) -> Optional[str]:
        """A line to print before this attention first runs on ``device`` when its start-up pauses long, or None."""
        return None
