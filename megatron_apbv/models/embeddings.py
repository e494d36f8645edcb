"""Input embeddings of a rank's tokens: text ids through the model's embedding, video frames
through the vision tower, encoded in parallel over the APB-V group (docs/design.md §6)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_apbv.models.gpt import DTYPES
from megatron_apbv.models.inputs import Prompt
from megatron_apbv.runtime.config import RunConfig


def build_vision_tower_for(cfg: RunConfig, device: torch.device):
    """Our Qwen2.5-VL tower (:mod:`megatron_apbv.models.vision_tower`) of ``cfg.vision``, output width
    ``model.hidden_size``, in ``cfg.dtype`` on ``device``.

    Weights come from ``model.checkpoint`` when it holds ``visual.*`` tensors,
    else they are seeded random ones.
    """
    from megatron_apbv.models.checkpoint import load_vision_weights
    from megatron_apbv.models.hf_config import read_hf_config, vision_config_from_hf
    from megatron_apbv.models.vision_tower import build_vision_tower

    v = cfg.vision
    settings = dict(
        depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads, intermediate_size=v.intermediate_size,
        patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
        window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
        out_hidden_size=cfg.model.hidden_size, in_channels=3,
    )
    tower = build_vision_tower(settings, seed=cfg.seed, dtype=torch.float32)
    if cfg.model.checkpoint and vision_config_from_hf(read_hf_config(cfg.model.checkpoint)) is not None:
        load_vision_weights(tower, cfg.model.checkpoint)
    return tower.to(device=device, dtype=DTYPES[cfg.dtype])


def input_embeddings(
    model, tower, prompt: Prompt, global_indices: torch.Tensor, device: torch.device, *, group=None
) -> Optional[torch.Tensor]:
    """``[s, b, h]`` embeddings of the tokens at ``global_indices``, video rows from the tower.

    ``None`` for a text-only prompt (the model embeds the ids itself). With
    ``group`` the frames are split over its ranks and the embeddings all-gathered
    (a prompt built with ``share`` holds only this rank's frames); without, one
    process encodes every frame.
    """
    if prompt.frames is None:
        return None
    from megatron_apbv.models.vision import (
        encode_frames,
        encode_frames_distributed,
        insert_video_embeddings,
    )

    if group is None:
        if prompt.shared:
            raise ValueError("single-process encoding needs every frame: build the prompt without a share")
        video = encode_frames(tower, prompt.frames, device=device)
    else:
        total = prompt.plan.num_frames if prompt.shared else None
        video = encode_frames_distributed(tower, prompt.frames, group=group, device=device, total_frames=total)
    text = model.embedding(input_ids=prompt.input_ids[:, global_indices].to(device), position_ids=None)
    return insert_video_embeddings(text, video, global_indices, prompt.video)
