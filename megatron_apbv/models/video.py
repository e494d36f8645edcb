"""Video files and video prompts: synthetic frames, PyAV encode/decode, prompt ids and 3-D positions.

Frames are ``uint8`` tensors ``[T, H, W, 3]`` (RGB) everywhere in this module.
PyAV (the ``video`` extra) is imported only by the functions that touch files,
so the prompt builder and the synthetic frames work without it.

Which frames are decoded is decided in ``video_sampling``; here a file is
probed (frame count, rate, size: :func:`probe_video`) and the wanted frames are
decoded by seeking to the keyframe before each one (:func:`decode_frames`), so
an hour-long file costs what its sampled frames cost. Frames are resized with
``torch.nn.functional.interpolate`` (bicubic, antialiased, as qwen-vl-utils).
Any problem with a file (missing, not a video, undecodable, no frames) raises
:class:`VideoError` naming the path and the cause.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn.functional as F

from megatron_apbv.runtime.config import VideoSource
from megatron_apbv.runtime.video_sampling import frame_indices


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


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of ``uint8 [T, H, W, 3]`` frames to ``size = (H', W')`` (as qwen-vl-utils)."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size={tuple(size)} must be positive")
    if tuple(frames.shape[1:3]) == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
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


def write_video(path, frames: torch.Tensor, fps: int = 8, *, codec: str | None = None, gop: int | None = None) -> None:
    """Encode ``uint8 [T, H, W, 3]`` RGB frames into a video file (container from the suffix, e.g. ``.mp4``).

    ``codec`` is ``"libx264"`` or ``"mpeg4"`` (default: :func:`video_codec`). High
    quality (libx264 ``crf=12``, or mpeg4 quantiser 1-2) so decoded frames stay
    close to the source. H and W must be even (yuv420p chroma subsampling).
    ``gop`` is the keyframe interval in frames (default: the encoder's). Only mpeg4 writes the same
    file every time: libx264 through PyAV's FFmpeg was measured to encode the same frames differently
    from run to run (pixel differences up to 11), so tests that need reproducible pixels pass ``codec="mpeg4"``.
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
        if gop is not None:
            stream.gop_size = int(gop)
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


class _Stream:
    """The first video stream of an open container, with frame index <-> timestamp arithmetic.

    Frame ``i`` is the frame presented at ``start + i / rate`` (the stream's
    average rate); a decoded frame's index is its timestamp rounded to that grid.
    """

    def __init__(self, path: str, container):
        if not container.streams.video:
            raise VideoError(path, "the file has no video stream")
        self.path, self.container = path, container
        self.stream = container.streams.video[0]
        self.stream.thread_type = "SLICE"  # frame threading delays the first frame after every seek
        rate = self.stream.average_rate or self.stream.guessed_rate
        if not rate or rate <= 0:
            raise VideoError(path, "the video stream has no frame rate")
        self.rate = Fraction(rate)
        self.time_base = Fraction(self.stream.time_base)
        self.start = self.stream.start_time or 0  # in time_base units

    def index_of(self, frame) -> int:
        pts = frame.pts if frame.pts is not None else frame.dts
        return round((pts - self.start) * self.time_base * self.rate)

    def pts_of(self, index: float) -> int:
        return self.start + math.floor(Fraction(index) / self.rate / self.time_base)

    def seek(self, index: float):
        """Decoded frames from the keyframe at or before frame ``index`` (an iterator)."""
        self.container.seek(max(self.pts_of(index), self.start), stream=self.stream, backward=True, any_frame=False)
        return self.container.decode(self.stream)

    def end_hint(self) -> float:
        """Roughly the frame count, from the container's metadata (a place to seek near the end)."""
        if self.stream.duration:
            return float(self.stream.duration * self.time_base * self.rate)
        if self.container.duration:
            return float(Fraction(self.container.duration, 1_000_000) * self.rate)
        return float(self.stream.frames or 0)


def _opened(path, work):
    """``work(_Stream)`` on the opened file, every failure a :class:`VideoError` naming ``path``."""
    av = _av()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(path, "no such file")
    if not os.path.isfile(path):
        raise VideoError(path, "not a regular file")
    try:
        with av.open(path, mode="r") as container:
            return work(_Stream(path, container))
    except VideoError:
        raise
    except av.error.FFmpegError as e:
        raise VideoError(path, f"FFmpeg: {e}") from e
    except (OSError, EOFError, ValueError, RuntimeError) as e:
        raise VideoError(path, f"{type(e).__name__}: {e}") from e


def probe_video(path) -> VideoSource:
    """Frame count, rate and size of a video file, decoding only its last keyframe interval.

    The frame count is not taken from the container's header (absent in some
    containers, wrong in others): it is one past the index of the last frame,
    found by seeking near the end and decoding forward to the end of the stream.
    """

    def probe(s: _Stream) -> VideoSource:
        last = None
        for frame in s.seek(max(s.end_hint() - 1, 0)):
            last = frame
        if last is None:  # the hint pointed past a short stream: its start is the only safe place
            for frame in s.seek(0):
                last = frame
        if last is None:
            raise VideoError(s.path, "the video stream has no decodable frames")
        return VideoSource(
            total_frames=s.index_of(last) + 1, fps=float(s.rate), height=last.height, width=last.width
        )

    return _opened(path, probe)


# Decoding forward past this many frames costs more than a seek plus a keyframe interval, typically.
_FORWARD_FRAMES = 16


def decode_frames(path, indices: Sequence[int]) -> torch.Tensor:
    """RGB frames ``uint8 [len(indices), H, W, 3]`` at ``indices``, decoding only around them.

    Indices are visited in increasing order; for each one the decoder seeks to the
    keyframe at or before it (unless it is a few frames ahead of the last decoded
    one) and decodes forward to it, so the cost grows with the number of frames
    asked for, not with the length of the video. A frame that is missing from the
    stream (variable frame rate) is replaced by the next one presented.
    """
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("decode_frames: no indices")
    if wanted[0] < 0:
        raise ValueError(f"frame index {wanted[0]} must be >= 0")

    def decode(s: _Stream) -> dict[int, torch.Tensor]:
        got: dict[int, torch.Tensor] = {}
        frames, position = None, None  # the current forward run and the last index it decoded
        for target in wanted:
            if position is None or not position < target <= position + _FORWARD_FRAMES:
                frames, position = _seek_before(s, target)
                if position >= target:  # the keyframe is the frame itself (position == target)
                    got[target] = frames.first
                    frames = frames.rest
                    continue
                frames = frames.rest
            for frame in frames:
                position = s.index_of(frame)
                if position >= target:
                    got[target] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                    break
            else:
                raise VideoError(s.path, f"frame {target} is past the end of the stream (last frame {position})")
        return got

    got = _opened(path, decode)
    return torch.stack([got[int(i)] for i in indices])


@dataclass
class _Run:
    first: torch.Tensor  # the first frame decoded after the seek, as RGB
    rest: object  # the decoder iterator, positioned after it


def _seek_before(s: _Stream, target: int) -> tuple[_Run, int]:
    """Seek so that the first decoded frame is at or before ``target``: ``(run, index of its first frame)``.

    A keyframe found by its decoding time can be presented after ``target`` (B-frames):
    step back further, doubling, until the first frame is not past it.
    """
    back = 0
    while True:
        frames = iter(s.seek(target - back))
        first = next(frames, None)
        if first is None:
            raise VideoError(s.path, f"no frame decodes after seeking to frame {target}")
        index = s.index_of(first)
        if index <= target or target - back <= 0:
            if index > target:
                raise VideoError(s.path, f"the stream's first frame is frame {index}, after frame {target}")
            return _Run(torch.from_numpy(first.to_ndarray(format="rgb24")), frames), index
        back = max(2 * back, 1)


def load_video(path, *, num_frames: int, size: tuple[int, int]) -> torch.Tensor:
    """``num_frames`` frames sampled uniformly over the whole video, resized to ``size = (H, W)``.

    Returns ``uint8 [num_frames, H, W, 3]``; frames are ``video_sampling.frame_indices``
    of the probed frame count, decoded by seeking (:func:`decode_frames`).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    source = probe_video(path)
    return resize_frames(decode_frames(path, frame_indices(source.total_frames, num_frames)), size)
