"""The prompt ``[system | video or document | question]``: token ids, global positions, and the video frames."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megatron_apbv.apbv.layout import Span
from megatron_apbv.models.rope import video_position_ids
from megatron_apbv.runtime.config import RunConfig
from megatron_apbv.runtime.video_sampling import FramePlan


@dataclass(frozen=True)
class Prompt:
    input_ids: torch.Tensor  # [b, N]
    position_ids: torch.Tensor  # [N] or [3, N] (multimodal RoPE)
    frames: Optional[torch.Tensor] = None  # [T, H, W, 3] uint8 (input.kind: video): all, or this rank's share
    video: Optional[Span] = None  # global span of the video tokens the vision tower fills
    plan: Optional[FramePlan] = None  # which frames, at which size (input.kind: video)
    shared: bool = False  # frames are only this rank's temporal groups (vision.frame_share)
    decode_seconds: float = 0.0  # reading / making the frames

    def local(self, global_indices: torch.Tensor) -> "Prompt":
        """The rank's tokens, with their global positions (frames and video span stay global)."""
        return replace(self, input_ids=self.input_ids[:, global_indices],
                       position_ids=self.position_ids[..., global_indices])


def frame_grid(tokens_per_frame: int) -> tuple[int, int]:
    """The most square ``(h, w)`` grid with ``h * w = tokens_per_frame``."""
    h = max(d for d in range(1, math.isqrt(tokens_per_frame) + 1) if tokens_per_frame % d == 0)
    return h, tokens_per_frame // h


def build_prompt(
    cfg: RunConfig, *, share: Optional[tuple[int, int]] = None, frames: Optional[torch.Tensor] = None
) -> Prompt:
    """The configured prompt: text around a synthetic or real video.

    The text is ``input.system_prompt`` / ``input.question`` in the tokenizer's chat
    template when a question is set, else seeded random ids. Positions are 1-D, or
    Qwen2.5-VL 3-D when ``model.mrope_section`` is set (the time step of a temporal
    group from the sampled fps, ``FramePlan.time_step``). With ``input.kind: video``
    the video tokens are placeholders (the tokenizer's ``<|video_pad|>``, else the
    last vocab id) that the vision embeddings replace. ``share = (rank, world)``
    reads only the frames of that rank's temporal groups (``vision.frame_share``);
    ``frames`` (all the sampled frames, at the plan's size) are used instead of
    decoding ``input.video_path`` or making the synthetic video.
    """
    inp = cfg.input
    if frames is not None and inp.kind != "video":
        raise ValueError(f"frames given for input.kind={inp.kind!r}: they need input.kind=video")
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    # the last id is reserved for video placeholders, so text never looks like video
    ids = torch.randint(0, cfg.model.vocab_size - 1, (inp.batch_size, cfg.prompt_len), generator=generator)
    plan = frames = video = None
    decode_seconds, shared = 0.0, False
    if inp.kind == "text":
        grid = None  # a document: 1-D positions (text positions of multimodal RoPE are equal in t, h, w)
    elif inp.kind != "video":
        grid = (inp.frame_count,) + frame_grid(inp.tokens_per_frame)
    else:
        plan = inp.frame_plan(cfg.vision)
        if frames is not None:
            if tuple(frames.shape[:3]) != (plan.num_frames, *plan.size):
                raise ValueError(f"frames {tuple(frames.shape)} do not match the {plan.num_frames} frames of "
                                 f"{list(plan.size)} the input section samples")
        else:
            frames, decode_seconds, shared = _frames(cfg, plan, share)
        unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
        grid = (plan.groups, plan.size[0] // unit, plan.size[1] // unit)
        video = Span(inp.system_tokens, inp.system_tokens + inp.video_tokens(cfg.vision))
        ids[:, video.start : video.stop] = cfg.model.vocab_size - 1  # placeholder id
    if inp.question is not None:
        ids = _with_chat_text(cfg, ids, video)
    if cfg.model.mrope_section is None:
        positions = torch.arange(cfg.prompt_len)
    elif grid is None:
        positions = torch.arange(cfg.prompt_len).expand(3, -1).clone()
    else:
        step = plan.time_step(cfg.vision.tokens_per_second) if plan is not None else 1.0
        positions = video_position_ids(inp.system_tokens, grid[0], grid[1:], inp.query_tokens, step)
    return Prompt(ids, positions, frames, video, plan, shared, decode_seconds)


def _frames(cfg: RunConfig, plan: FramePlan, share) -> tuple[torch.Tensor, float, bool]:
    """The video's frames (all, or the share's), the seconds it took, and whether they are a share."""
    from megatron_apbv.models.video import decode_frames, resize_frames, synthetic_video
    from megatron_apbv.models.vision import frame_share

    first, last = 0, plan.num_frames
    if share is not None:
        first, last = frame_share(plan.num_frames, plan.temporal_patch_size, share[1], share[0])
    start = time.perf_counter()
    if cfg.input.video_path is None:
        frames = synthetic_video(plan.num_frames, *plan.size, seed=cfg.seed)[first:last]
    elif last > first:
        frames = resize_frames(decode_frames(cfg.input.video_path, plan.indices[first:last]), plan.size)
    else:
        frames = torch.empty(0, *plan.size, 3, dtype=torch.uint8)
    return frames, time.perf_counter() - start, (first, last) != (0, plan.num_frames)


def _with_chat_text(cfg: RunConfig, ids: torch.Tensor, video: Optional[Span]) -> torch.Tensor:
    """``ids`` with the chat text before and after the video (every batch row the same)."""
    from megatron_apbv.models.chat_prompt import chat_text, read_context

    inp = cfg.input
    context = read_context(inp.context, inp.context_path) if inp.kind == "text" else None
    text = chat_text(cfg.model.tokenizer_dir, inp.system_prompt, inp.question, context)
    # load_config set the lengths from this same text; a mismatch is a bug, not bad input
    assert (len(text.before), len(text.after)) == (inp.system_tokens, inp.query_tokens)
    ids = ids.clone()
    n = cfg.prompt_len
    ids[:, : inp.system_tokens] = torch.tensor(text.before, dtype=torch.long)
    if text.context is not None:
        assert len(text.context) == inp.context_tokens
        ids[:, inp.system_tokens : n - inp.query_tokens] = torch.tensor(text.context, dtype=torch.long)
    ids[:, n - inp.query_tokens :] = torch.tensor(text.after, dtype=torch.long)
    if video is not None and text.video_token_id is not None:
        ids[:, video.start : video.stop] = text.video_token_id
    return ids
