"""Video files and video prompts: synthetic frames, PyAV encode/decode, prompt ids and 3-D positions.

Frames are ``uint8`` tensors ``[T, H, W, 3]`` (RGB) everywhere in this module.
PyAV (the ``video`` extra) is imported only by the functions that touch files,
so the prompt builder and the synthetic frames work without it.

Decoding samples ``num_frames`` frames uniformly over the whole video: frame
indices ``round(linspace(0, total - 1, num_frames))`` (round half to even, as
``torch.round``), then resizes them with ``torch.nn.functional.interpolate``
(bilinear, antialiased). Any problem with a file (missing, not a video,
undecodable, no frames) raises :class:`VideoError` naming the path and the cause.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from megatron_apbv.apbv.layout import Span
from megatron_apbv.models.rope import video_position_ids


class VideoError(ValueError):
    """A video file could not be read: the message names the path and the cause."""

    def __init__(self, path, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"cannot read video {self.path!r}: {cause}")


# --------------------------------------------------------------------------- frames


def synthetic_video(num_frames: int, height: int, width: int, *, seed: int) -> torch.Tensor:
    """Deterministic structured noise, ``uint8 [num_frames, height, width, 3]``.

    Coarse random colour fields (a few control points per side, bilinearly
    upsampled) that drift smoothly between random keyframes, plus a moving
    sinusoidal pattern: smooth enough for a lossy codec to reproduce closely,
    different in every frame and every seed.
    """
    if num_frames < 0 or height < 1 or width < 1:
        raise ValueError(f"synthetic_video: bad shape T={num_frames}, H={height}, W={width}")
    if num_frames == 0:
        return torch.empty(0, height, width, 3, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    keyframe_every = 8
    num_keys = num_frames // keyframe_every + 2
    keys = torch.rand(num_keys, 3, 4, 4, generator=gen, dtype=torch.float64)
    # Time interpolation between keyframes.
    t = torch.arange(num_frames, dtype=torch.float64) / keyframe_every
    lo = t.floor().long()
    frac = (t - lo)[:, None, None, None]
    coarse = keys[lo] * (1 - frac) + keys[lo + 1] * frac  # [T, 3, 4, 4]
    field = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    # A moving wave, with a per-seed direction and phase.
    angle, phase = (torch.rand(2, generator=gen, dtype=torch.float64) * 2 * torch.pi).tolist()
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    direction = (yy * torch.sin(torch.tensor(angle)) + xx * torch.cos(torch.tensor(angle))) / max(height, width)
    wave = torch.sin(2 * torch.pi * (2 * direction[None] + 0.05 * torch.arange(num_frames)[:, None, None]) + phase)
    video = 0.75 * field + 0.25 * (0.5 + 0.5 * wave[:, None])  # [T, 3, H, W] in [0, 1]
    return (video * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def sample_indices(total_frames: int, num_frames: int) -> torch.Tensor:
    """Uniform frame indices over the whole video: ``round(linspace(0, total - 1, num_frames))``."""
    if total_frames < 1:
        raise ValueError(f"total_frames={total_frames} must be >= 1")
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    return torch.linspace(0, total_frames - 1, num_frames, dtype=torch.float64).round().long()


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``uint8 [T, H, W, 3]`` frames to ``size = (H', W')``."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size={tuple(size)} must be positive")
    if tuple(frames.shape[1:3]) == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------- files


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading and writing video files needs PyAV: pip install 'megatron-apbv[video]'") from e
    return av


def video_codec() -> str:
    """The encoder ``write_video`` uses: libx264 when PyAV's FFmpeg has it (the PyPI wheels do), else mpeg4."""
    av = _av()
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path, frames: torch.Tensor, fps: int = 8, *, codec: str | None = None) -> None:
    """Encode ``uint8 [T, H, W, 3]`` RGB frames into a video file (container from the suffix, e.g. ``.mp4``).

    ``codec`` is ``"libx264"`` or ``"mpeg4"`` (default: :func:`video_codec`). High
    quality (libx264 ``crf=12``, or mpeg4 quantiser 1-2) so decoded frames stay
    close to the source. H and W must be even (yuv420p chroma subsampling).
    """
    av = _av()
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"frame size {height}x{width}: yuv420p needs an even height and width")
    codec = codec or video_codec()
    if codec not in ("libx264", "mpeg4"):
        raise ValueError(f"codec={codec!r}: expected 'libx264' or 'mpeg4'")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}
        else:
            stream.options = {"qmin": "1", "qmax": "2"}
        if frames.shape[0] == 0 and hasattr(container, "start_encoding"):
            container.start_encoding()  # PyAV writes the header lazily: make the empty file exist
        for frame in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def _decode(path: str, wanted: Sequence[int] | None) -> tuple[int, dict[int, torch.Tensor]]:
    """One decoding pass: the number of frames, and the RGB frames whose index is in ``wanted``."""
    av = _av()
    want = set(wanted) if wanted is not None else set()
    got: dict[int, torch.Tensor] = {}
    count = 0
    with av.open(path, mode="r") as container:
        if not container.streams.video:
            raise VideoError(path, "the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in want:
                got[count] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
            count += 1
    return count, got


def load_video(path, *, num_frames: int, size: tuple[int, int]) -> torch.Tensor:
    """Decode ``num_frames`` frames sampled uniformly over the whole video, resized to ``size = (H, W)``.

    Returns ``uint8 [num_frames, H, W, 3]``. The container's frame count is used
    as a hint to pick frames in one pass; when it is absent or wrong, the video
    is counted first and decoded again.
    """
    av = _av()
    path = os.fspath(path)
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    if not os.path.exists(path):
        raise VideoError(path, "no such file")
    if not os.path.isfile(path):
        raise VideoError(path, "not a regular file")
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                raise VideoError(path, "the file has no video stream")
            hint = int(container.streams.video[0].frames or 0)
        indices = sample_indices(hint, num_frames).tolist() if hint > 0 else None
        total, got = _decode(path, indices)
        if total == 0:
            raise VideoError(path, "the video stream has no decodable frames")
        if indices is None or total != hint:
            indices = sample_indices(total, num_frames).tolist()
            total_again, got = _decode(path, indices)
            if total_again != total:
                raise VideoError(path, f"decoding is not repeatable ({total} then {total_again} frames)")
    except VideoError:
        raise
    except av.error.FFmpegError as e:
        raise VideoError(path, f"FFmpeg: {e}") from e
    except (OSError, EOFError, ValueError, RuntimeError) as e:
        raise VideoError(path, f"{type(e).__name__}: {e}") from e
    frames = torch.stack([got[i] for i in indices])
    return resize_frames(frames, size)


# --------------------------------------------------------------------------- prompt


@dataclass(frozen=True)
class VideoPrompt:
    """Token ids and Qwen2.5-VL 3-D positions of ``[system | video | question + assistant header]``.

    ``video`` is the global span of the video placeholder tokens (where the vision
    embeddings go); ``query_len`` is the APB-V query: everything after the video.
    """

    input_ids: torch.Tensor  # [N] long
    position_ids: torch.Tensor  # [3, N] long
    video: Span
    query_len: int
    grid: tuple[int, int, int]  # (t, h, w) of the video tokens

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_video_tokens(self) -> int:
        return len(self.video)


def build_video_prompt(
    system_ids: Sequence[int],
    video_grid: tuple[int, int, int],
    question_ids: Sequence[int],
    *,
    video_token_id: int,
    assistant_ids: Sequence[int] = (),
) -> VideoPrompt:
    """Tokenizer-agnostic prompt: ids in, ids out.

    ``video_grid = (t, h, w)`` is the grid of video *tokens* (temporal groups and
    merged patches, e.g. ``vision.VisionGrid.token_grid``), so the video takes
    ``t * h * w`` placeholder ids ``video_token_id``. Whatever should precede the
    video (system prompt, vision-start marker) goes in ``system_ids``; everything
    after it (vision-end marker, question, assistant header) in ``question_ids``
    and ``assistant_ids``, and is the query span.
    """
    t, h, w = (int(v) for v in video_grid)
    if min(t, h, w) < 0:
        raise ValueError(f"video_grid={tuple(video_grid)} must be non-negative")
    if t > 0 and h * w == 0:
        raise ValueError(f"video_grid={tuple(video_grid)}: frames without tokens (h * w = 0)")
    before = torch.as_tensor(list(system_ids), dtype=torch.long)
    after = torch.cat(
        [torch.as_tensor(list(question_ids), dtype=torch.long), torch.as_tensor(list(assistant_ids), dtype=torch.long)]
    )
    num_video = t * h * w
    ids = torch.cat([before, torch.full((num_video,), int(video_token_id), dtype=torch.long), after])
    positions = video_position_ids(len(before), t, (h, w), len(after))
    return VideoPrompt(
        input_ids=ids,
        position_ids=positions,
        video=Span(len(before), len(before) + num_video),
        query_len=int(after.shape[0]),
        grid=(t, h, w),
    )
