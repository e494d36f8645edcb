"""Rotary position embedding from explicit (global) position ids, 1-D or Qwen2.5-VL 3-D.

Megatron-core's rotary modules derive positions from the local sequence length
and allocate on CUDA; APB-V ranks hold non-contiguous pieces of the prompt, so
RoPE must come from the global position ids of each local token. The output has
Megatron's ``rotary_pos_emb`` format, ``[s, 1, 1, dim]`` (non-interleaved), and is
applied by Megatron's own ``apply_rotary_pos_emb`` inside ``SelfAttention``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class PositionRotaryEmbedding(torch.nn.Module):
    """RoPE angles for given position ids.

    ``position_ids`` is ``[s]`` (1-D RoPE) or ``[3, s]`` (multimodal RoPE: time,
    height, width). With ``mrope_section = (t, h, w)`` (summing to ``dim / 2``),
    frequency ``i`` uses the time position for the first ``t`` frequencies, the
    height position for the next ``h`` and the width position for the last ``w``.
    """

    def __init__(self, dim: int, base: float, mrope_section: Optional[Sequence[int]] = None):
        super().__init__()
        if mrope_section is not None and sum(mrope_section) != dim // 2:
            raise ValueError(f"mrope_section={list(mrope_section)} must sum to dim/2 = {dim // 2}")
        self.dim = dim
        self.mrope_section = tuple(mrope_section) if mrope_section is not None else None
        # float64 angles: positions reach 10^6 and fp32 would lose the low frequencies' phase.
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # which axis (time, height, width) each frequency follows; a buffer, so forward never copies host->device
        sections = self.mrope_section or (dim // 2, 0, 0)
        self.register_buffer(
            "axis_of_freq", torch.repeat_interleave(torch.arange(3), torch.tensor(sections)), persistent=False
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        pos = position_ids.to(self.inv_freq.device, torch.float64)
        if pos.dim() == 1:
            if self.mrope_section is not None:
                pos = pos.expand(3, -1)
            else:
                angles = pos[:, None] * self.inv_freq[None, :]
                return self._format(angles)
        if pos.dim() != 2 or pos.shape[0] != 3 or self.mrope_section is None:
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)}: expected [s], or [3, s] with mrope_section set"
            )
        per_axis = pos[:, :, None] * self.inv_freq[None, None, :]  # [3, s, dim/2]
        angles = per_axis.gather(0, self.axis_of_freq.view(1, 1, -1).expand(1, pos.shape[1], -1))[0]
        return self._format(angles)

    def per_sequence(self, position_ids: torch.Tensor) -> torch.Tensor:
        """RoPE of a batch whose sequences sit at different positions: ``[b, s]``, ``[3, b, s]`` -> ``[s, b, 1, dim]``.

        Megatron's ``apply_rotary_pos_emb`` broadcasts the batch dimension, so each
        sequence gets its own angles (decoding a batch of different prompt lengths).
        """
        b, s = position_ids.shape[-2:]
        flat = position_ids.transpose(-1, -2).reshape(*position_ids.shape[:-2], s * b)  # token-major
        return self.forward(flat).view(s, b, 1, -1)

    @staticmethod
    def _format(angles: torch.Tensor) -> torch.Tensor:
        # Kept in float64: Megatron takes cos/sin of these angles, then casts to the activations' dtype.
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def video_position_ids(
    text_before: int, frames: int, grid: tuple[int, int], text_after: int, time_interval: float = 1.0
) -> torch.Tensor:
    """Qwen2.5-VL style 3-D positions ``[3, s]`` of ``text | video | text``.

    Text tokens advance all three axes together; video token ``(f, y, x)`` of
    temporal group ``f`` sits at ``start + (floor(f * time_interval), y, x)``, where
    Qwen2.5-VL's ``time_interval`` is ``tokens_per_second`` x the seconds one
    temporal group spans; text after the video resumes at one past the largest
    position used (the original Qwen2.5-VL rule).
    """
    gh, gw = grid
    before = torch.arange(text_before).expand(3, -1)
    t = (torch.arange(frames, dtype=torch.float64) * time_interval).long()
    f, y, x = torch.meshgrid(t, torch.arange(gh), torch.arange(gw), indexing="ij")
    video = torch.stack([f.flatten(), y.flatten(), x.flatten()]) + text_before
    nxt = int(video.max()) + 1 if frames else text_before
    after = (torch.arange(text_after) + nxt).expand(3, -1)
    return torch.cat([before, video, after], dim=1)
