"""Which frames of a video the model sees, at which size, and how far apart they are in time.

The rules are those Qwen2.5-VL users prepare videos with (its reference
preprocessing, ``qwen-vl-utils``):

* Frame count. Sampling by fps: ``n = total / video_fps * fps`` clamped to
  ``[ceil(min_frames), floor(min(max_frames, total))]`` (both rounded to the
  temporal patch), then to ``total``, then floored to a multiple of the temporal
  patch (``FRAME_FACTOR``). An explicit count (``input.video_frames``) is used as
  given (an odd count is padded by the tower, as the HF processor does).
* Frames. ``round(i * (total - 1) / (n - 1))``, uniform over the whole video,
  round half to even. This is exact rational arithmetic; the reference's float32
  ``linspace`` can differ by one index on videos of more than ~2^16 frames.
* Size. ``smart_resize``: each side rounded to a multiple of ``patch x merge``,
  then scaled (keeping the aspect ratio) into ``[min_pixels, max_pixels]``, where
  the per-frame maximum is also capped by the video budget:
  ``max(total_pixels / n * temporal_patch, 1.05 * min_pixels)``.
* Time. The sampled rate is ``n / total * video_fps``; one temporal group spans
  ``second_per_grid_ts = temporal_patch / sampled_fps`` seconds, and the 3-D RoPE
  time step of a group is ``tokens_per_second * second_per_grid_ts``.

A video without a file (the seeded synthetic one) has no rate: its count and
size are explicit (or the defaults below) and each group is one time step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

# Qwen2.5-VL's video defaults (qwen-vl-utils): pixels per frame and over the whole video.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 4, 768
MAX_RATIO = 200  # the largest aspect ratio smart_resize accepts
# Without a file: the synthetic video's frames and size.
SYNTHETIC_FRAMES, SYNTHETIC_SIZE = 8, (56, 56)


def _round(x: float, factor: int) -> int:
    return round(x / factor) * factor


def _ceil(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: float) -> tuple[int, int]:
    """``(H, W)``: multiples of ``factor`` near ``(height, width)`` with ``min_pixels <= H * W <= max_pixels``."""
    if min(height, width) < 1:
        raise ValueError(f"frame size {height}x{width} must be positive")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"frame size {height}x{width}: the aspect ratio exceeds {MAX_RATIO}")
    h = max(factor, _round(height, factor))
    w = max(factor, _round(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = _floor(height / beta, factor), _floor(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = _ceil(height * beta, factor), _ceil(width * beta, factor)
    return h, w


def fps_frame_count(
    total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int, factor: int
) -> int:
    """Frames sampled at ``fps`` from a video of ``total_frames`` at ``video_fps`` (see the module docstring)."""
    low = _ceil(min_frames, factor)
    high = _floor(min(max_frames, total_frames), factor)
    n = min(max(total_frames / video_fps * fps, low), high, total_frames)
    n = _floor(n, factor)
    if n < factor:
        raise ValueError(
            f"input.video_path has {total_frames} frames: sampling by input.fps needs at least "
            f"vision.temporal_patch_size={factor}; set input.video_frames to repeat frames"
        )
    return n


def frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """``round(i * (total - 1) / (num_frames - 1))`` for ``i < num_frames`` (half to even, exact)."""
    if total_frames < 1:
        raise ValueError(f"total_frames={total_frames} must be >= 1")
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    if num_frames == 1:
        return [0]
    return [round(Fraction(i * (total_frames - 1), num_frames - 1)) for i in range(num_frames)]


@dataclass(frozen=True)
class FramePlan:
    """The sampled video: frame count, frame size, source frames and the seconds per temporal group."""

    num_frames: int
    size: tuple[int, int]  # (H, W) after resizing
    temporal_patch_size: int
    total_frames: Optional[int] = None  # the file's frame count (None: synthetic video)
    video_fps: Optional[float] = None
    source_size: Optional[tuple[int, int]] = None
    second_per_grid_ts: Optional[float] = None  # None: one RoPE time step per temporal group

    @property
    def groups(self) -> int:
        return -(-self.num_frames // self.temporal_patch_size)

    @property
    def indices(self) -> list[int]:
        """Source frame of every sampled frame (a file's video only)."""
        if self.total_frames is None:
            raise ValueError("a synthetic video has no source frames")
        return frame_indices(self.total_frames, self.num_frames) if self.num_frames else []

    @property
    def sampled_fps(self) -> Optional[float]:
        if self.total_frames is None or not self.num_frames:
            return None
        return self.num_frames / self.total_frames * self.video_fps

    @property
    def duration_seconds(self) -> Optional[float]:
        return None if self.total_frames is None else self.total_frames / self.video_fps

    def time_step(self, tokens_per_second: float) -> float:
        """RoPE time positions between consecutive temporal groups."""
        return 1.0 if self.second_per_grid_ts is None else tokens_per_second * self.second_per_grid_ts

    def record(self, tokens_per_second: float) -> dict:
        """The JSON description of the sampling (``video`` in the run / generate records)."""
        return {
            "frames": self.num_frames,
            "frame_size": list(self.size),
            "temporal_groups": self.groups,
            "sampled_fps": self.sampled_fps,
            "second_per_grid_ts": self.second_per_grid_ts,
            "rope_time_step": self.time_step(tokens_per_second),
            "source_frames": self.total_frames,
            "source_fps": self.video_fps,
            "source_size": list(self.source_size) if self.source_size else None,
            "duration_seconds": self.duration_seconds,
        }


def frame_plan(inp, vision) -> FramePlan:
    """The :class:`FramePlan` of ``input`` (an ``InputConfig``) for the tower of ``vision`` (a ``VisionConfig``).

    ``input.source`` (what the loader read from ``input.video_path``) gives the
    file's frame count, rate and size; explicit ``input.video_frames`` /
    ``input.frame_size`` / ``input.seconds_per_frame`` win over the rules.
    Errors name the ``input`` field to change.
    """
    tp, factor = vision.temporal_patch_size, vision.patch_size * vision.spatial_merge_size
    src = inp.source
    if inp.video_frames is not None:
        n = inp.video_frames
    elif src is None:
        n = SYNTHETIC_FRAMES
    else:
        n = fps_frame_count(src.total_frames, src.fps, inp.fps, inp.min_frames, inp.max_frames, tp)
    if inp.frame_size is not None:
        size = tuple(inp.frame_size)
    elif src is None:
        size = SYNTHETIC_SIZE
    else:
        cap = max(inp.total_pixels / max(n, 1) * tp, int(inp.min_pixels * 1.05))
        try:
            size = smart_resize(src.height, src.width, factor, inp.min_pixels, min(inp.max_pixels, cap))
        except ValueError as err:
            raise ValueError(f"input.video_path: {err}; set input.frame_size") from None
    if inp.seconds_per_frame is not None:
        spg = tp * inp.seconds_per_frame
    elif src is None or n == 0:
        spg = None
    else:
        spg = tp / (n / src.total_frames * src.fps)
    return FramePlan(
        num_frames=n, size=size, temporal_patch_size=tp,
        total_frames=src.total_frames if src else None, video_fps=src.fps if src else None,
        source_size=(src.height, src.width) if src else None, second_per_grid_ts=spg,
    )
