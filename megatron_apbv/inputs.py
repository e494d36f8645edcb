"""Synthetic prompt: token ids and global position ids of ``[system | video | question]``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_apbv.config import RunConfig
from megatron_apbv.rope import video_position_ids


@dataclass(frozen=True)
class Prompt:
    input_ids: torch.Tensor  # [b, N]
    position_ids: torch.Tensor  # [N] or [3, N] (multimodal RoPE)

    def local(self, global_indices: torch.Tensor) -> "Prompt":
        """The rank's tokens, with their global positions."""
        return Prompt(self.input_ids[:, global_indices], self.position_ids[..., global_indices])


def frame_grid(tokens_per_frame: int) -> tuple[int, int]:
    """The most square ``(h, w)`` grid with ``h * w = tokens_per_frame``."""
    h = max(d for d in range(1, math.isqrt(tokens_per_frame) + 1) if tokens_per_frame % d == 0)
    return h, tokens_per_frame // h


def synthetic_prompt(cfg: RunConfig) -> Prompt:
    """Seeded random token ids; 1-D positions, or Qwen2.5-VL 3-D positions when ``model.mrope_section`` is set."""
    inp = cfg.input
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(0, cfg.model.vocab_size, (inp.batch_size, inp.prompt_len), generator=generator)
    if cfg.model.mrope_section is None:
        positions = torch.arange(inp.prompt_len)
    else:
        positions = video_position_ids(
            inp.system_tokens, inp.video_frames, frame_grid(inp.tokens_per_frame), inp.query_tokens
        )
    return Prompt(ids, positions)
