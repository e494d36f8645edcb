"""The prompt ``[system | video | question]``: token ids, global positions, and the video frames."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megatron_apbv.apbv.layout import Span
from megatron_apbv.models.rope import video_position_ids
from megatron_apbv.runtime.config import RunConfig


@dataclass(frozen=True)
class Prompt:
    input_ids: torch.Tensor  # [b, N]
    position_ids: torch.Tensor  # [N] or [3, N] (multimodal RoPE)
    frames: Optional[torch.Tensor] = None  # [T, H, W, 3] uint8 (input.kind: video)
    video: Optional[Span] = None  # global span of the video tokens the vision tower fills

    def local(self, global_indices: torch.Tensor) -> "Prompt":
        """The rank's tokens, with their global positions (frames and video span stay global)."""
        return replace(self, input_ids=self.input_ids[:, global_indices],
                       position_ids=self.position_ids[..., global_indices])


def frame_grid(tokens_per_frame: int) -> tuple[int, int]:
    """The most square ``(h, w)`` grid with ``h * w = tokens_per_frame``."""
    h = max(d for d in range(1, math.isqrt(tokens_per_frame) + 1) if tokens_per_frame % d == 0)
    return h, tokens_per_frame // h


def build_prompt(cfg: RunConfig, frames: Optional[torch.Tensor] = None) -> Prompt:
    """The configured prompt: text around a synthetic or real video.

    The text is ``input.system_prompt`` / ``input.question`` in the tokenizer's chat
    template when a question is set, else seeded random ids. Positions are 1-D, or
    Qwen2.5-VL 3-D when ``model.mrope_section`` is set. With ``input.kind: video``
    the video tokens are placeholders (the tokenizer's ``<|video_pad|>``, else the
    last vocab id) that the vision embeddings replace. ``frames`` (``input.kind: video``)
    are used instead of decoding ``input.video_path`` or making the synthetic video;
    they must have ``input.video_frames`` frames of ``input.frame_size``.
    """
    inp = cfg.input
    if frames is not None and inp.kind != "video":
        raise ValueError(f"frames given for input.kind={inp.kind!r}: they need input.kind=video")
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    # the last id is reserved for video placeholders, so text never looks like video
    ids = torch.randint(0, cfg.model.vocab_size - 1, (inp.batch_size, cfg.prompt_len), generator=generator)
    if inp.kind == "synthetic":
        grid = (inp.video_frames,) + frame_grid(inp.tokens_per_frame)
        frames = video = None
    else:
        from megatron_apbv.models.video import load_video, synthetic_video

        height, width = inp.frame_size
        if frames is not None:
            if tuple(frames.shape[:3]) != (inp.video_frames, height, width):
                raise ValueError(f"frames {tuple(frames.shape)} do not match input.video_frames={inp.video_frames} "
                                 f"and input.frame_size={[height, width]}")
        elif inp.video_path is None:
            frames = synthetic_video(inp.video_frames, height, width, seed=cfg.seed)
        else:
            frames = load_video(inp.video_path, num_frames=inp.video_frames, size=(height, width))
        unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
        groups = -(-inp.video_frames // cfg.vision.temporal_patch_size)
        grid = (groups, height // unit, width // unit)
        video = Span(inp.system_tokens, inp.system_tokens + inp.video_tokens(cfg.vision))
        ids[:, video.start : video.stop] = cfg.model.vocab_size - 1  # placeholder id
    if inp.question is not None:
        ids = _with_chat_text(cfg, ids, video)
    if cfg.model.mrope_section is None:
        positions = torch.arange(cfg.prompt_len)
    else:
        interval = 1.0
        if inp.kind == "video" and inp.seconds_per_frame is not None:
            group_seconds = cfg.vision.temporal_patch_size * inp.seconds_per_frame
            interval = cfg.vision.tokens_per_second * group_seconds
        positions = video_position_ids(inp.system_tokens, grid[0], grid[1:], inp.query_tokens, interval)
    return Prompt(ids, positions, frames, video)


def _with_chat_text(cfg: RunConfig, ids: torch.Tensor, video: Optional[Span]) -> torch.Tensor:
    """``ids`` with the chat text before and after the video (every batch row the same)."""
    from megatron_apbv.models.chat_prompt import chat_text

    inp = cfg.input
    text = chat_text(cfg.model.tokenizer_dir, inp.system_prompt, inp.question)
    # load_config set the lengths from this same text; a mismatch is a bug, not bad input
    assert (len(text.before), len(text.after)) == (inp.system_tokens, inp.query_tokens)
    ids = ids.clone()
    n = cfg.prompt_len
    ids[:, : inp.system_tokens] = torch.tensor(text.before, dtype=torch.long)
    ids[:, n - inp.query_tokens :] = torch.tensor(text.after, dtype=torch.long)
    if video is not None and text.video_token_id is not None:
        ids[:, video.start : video.stop] = text.video_token_id
    return ids
