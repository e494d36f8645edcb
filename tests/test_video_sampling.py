"""Frame sampling and seek decoding: Qwen2.5-VL's rules (a reference written here), per-rank shares, long videos."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import pytest
import torch

from megatron_apbv.runtime.video_sampling import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    frame_plan,
    smart_resize,
)
from megatron_apbv.runtime.config import ConfigError, InputConfig, VideoSource, VisionConfig
from megatron_apbv.models.resolve import load_config

# --------------------------------------------------------------------------- reference


def reference_sampling(total, video_fps, height, width, *, fps=2.0, min_frames=4, max_frames=768, nframes=None,
                       min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, total_pixels=int(128000 * 28 * 28 * 0.9),
                       factor=28, frame_factor=2):
    """qwen-vl-utils' video rules, restated step by step (smart_nframes, linspace indices, fetch_video's resize)."""
    if nframes is None:
        lo = math.ceil(min_frames / frame_factor) * frame_factor
        hi = math.floor(min(max_frames, total) / frame_factor) * frame_factor
        n = total / video_fps * fps
        n = max(n, lo)
        n = min(n, hi)
        n = min(n, total)
        n = math.floor(n / frame_factor) * frame_factor
        if n < frame_factor:
            return None
    else:
        n = nframes
    indices = [int(round(Fraction(i * (total - 1)) / (n - 1))) if n > 1 else 0 for i in range(n)]
    sample_fps = n / total * video_fps
    per_frame = min(max_pixels, max(min(VIDEO_MAX_PIXELS, total_pixels / n * frame_factor), int(min_pixels * 1.05)))
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > per_frame:
        beta = math.sqrt(height * width / per_frame)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return n, indices, (h, w), frame_factor / sample_fps


VISION = VisionConfig()  # patch 14, merge 2, temporal patch 2: Qwen2.5-VL's
CASES = [
    # total frames, video fps, height, width, input overrides
    (300, 30.0, 480, 640, {}),  # 10 s at 30 fps: 20 frames
    (3, 30.0, 480, 640, {}),  # shorter than min_frames: 2 frames
    (5, 25.0, 64, 96, {}),  # shorter than min_frames, tiny frames scaled up to min_pixels
    (90, 29.97, 1080, 1920, {"fps": 1.0}),  # 3 s: min_frames wins (4)
    (108000, 30.0, 720, 1280, {}),  # 1 hour at 30 fps: max_frames caps (768), total_pixels shrinks frames
    (108000, 30.0, 720, 1280, {"max_frames": 64, "fps": 0.5}),
    (1234, 24.0, 360, 480, {"fps": 3.5, "min_frames": 7}),  # min_frames rounded up to 8
    (250, 25.0, 2160, 3840, {"max_pixels": 256 * 28 * 28, "total_pixels": 100 * 28 * 28}),  # budget below min
    (7201, 2.0, 32, 32, {"fps": 2.0, "max_frames": 100}),
    (333, 30.0, 100, 300, {"video_frames": 12}),  # explicit count: sampled fps from it
    (333, 30.0, 100, 300, {"video_frames": 7, "min_pixels": 28 * 28, "max_pixels": 28 * 28 * 8}),
]


@pytest.mark.parametrize("total,video_fps,height,width,overrides", CASES)
def test_plan_equals_the_reference_rules(total, video_fps, height, width, overrides):
    inp = InputConfig(kind="video", video_path="x.mp4", source=VideoSource(
        total_frames=total, fps=video_fps, height=height, width=width), **overrides)
    plan = frame_plan(inp, VISION)
    keys = {k: v for k, v in overrides.items() if k != "video_frames"}
    ref = reference_sampling(total, video_fps, height, width, nframes=overrides.get("video_frames"), **keys)
    n, indices, size, spg = ref
    assert (plan.num_frames, plan.indices, plan.size) == (n, indices, size)
    assert plan.second_per_grid_ts == pytest.approx(spg, rel=1e-12)
    assert plan.groups == -(-n // 2)
    record = plan.record(VISION.tokens_per_second)
    assert record["frames"] == n and record["frame_size"] == list(size)
    assert record["sampled_fps"] == pytest.approx(n / total * video_fps)
    assert record["duration_seconds"] == pytest.approx(total / video_fps)
    assert record["rope_time_step"] == pytest.approx(VISION.tokens_per_second * spg)


def test_defaults_are_qwen_vl_utils_video_defaults():
    inp = InputConfig()
    assert (inp.fps, inp.min_frames, inp.max_frames) == (FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES) == (2.0, 4, 768)
    assert (inp.min_pixels, inp.max_pixels, inp.total_pixels) == (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS)


def test_overrides_win():
    src = VideoSource(total_frames=100, fps=10.0, height=300, width=400)
    plan = frame_plan(InputConfig(kind="video", video_path="x", source=src, video_frames=5, frame_size=(56, 84),
                                  seconds_per_frame=0.25), VISION)
    assert (plan.num_frames, plan.size, plan.second_per_grid_ts) == (5, (56, 84), 0.5)
    synthetic = frame_plan(InputConfig(kind="video"), VISION)  # no file: 8 frames of 56 x 56, one step per group
    assert (synthetic.num_frames, synthetic.size, synthetic.second_per_grid_ts) == (8, (56, 56), None)
    assert synthetic.time_step(4.0) == 1.0


def test_too_short_video_names_the_field():
    src = VideoSource(total_frames=1, fps=30.0, height=64, width=64)
    with pytest.raises(ValueError, match="input.video_frames"):
        frame_plan(InputConfig(kind="video", video_path="x", source=src), VISION)
    assert frame_plan(InputConfig(kind="video", video_path="x", source=src, video_frames=2), VISION).indices == [0, 0]
    with pytest.raises(ValueError, match="input.min_frames"):
        InputConfig(min_frames=10, max_frames=8)
    with pytest.raises(ValueError, match="input.min_pixels"):
        InputConfig(min_pixels=10, max_pixels=8)


@pytest.mark.parametrize("height,width", [(480, 640), (33, 1000), (28, 28), (4000, 3000), (720, 1280), (50, 7000)])
def test_smart_resize_matches_transformers(height, width):
    """transformers' Qwen2-VL smart_resize (its PIL module imports without torchvision), image and video limits.

    (It differs from qwen-vl-utils' only where a side rounds below one factor: see the next test.)
    """
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize
    except ImportError as err:
        pytest.skip(f"transformers' Qwen2-VL smart_resize unavailable: {err}")
    for lo, hi in [(56 * 56, 28 * 28 * 1280), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)]:
        assert smart_resize(height, width, 28, lo, hi) == tuple(hf_resize(height, width, 28, lo, hi))


def test_smart_resize_of_thin_frames_keeps_one_factor():
    """qwen-vl-utils raises a side that rounds to 0 to one factor before checking the pixel limits."""
    assert smart_resize(1, 150, 28, 56 * 56, 28 * 28 * 1280) == (28, 140)
    assert smart_resize(100, 10, 28, 56 * 56, 28 * 28 * 1280) == (112, 28)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201, 28, 56 * 56, 28 * 28 * 1280)


def test_matches_qwen_vl_utils_where_importable():
    vp = pytest.importorskip("qwen_vl_utils.vision_process")  # needs torchvision
    for total, video_fps, height, width, overrides in CASES:
        if "video_frames" in overrides:
            continue
        keys = {k: v for k, v in overrides.items() if k in ("fps", "min_frames", "max_frames")}
        inp = InputConfig(kind="video", video_path="x", source=VideoSource(
            total_frames=total, fps=video_fps, height=height, width=width), **overrides)
        try:
            n = vp.smart_nframes(keys, total_frames=total, video_fps=video_fps)
        except ValueError:
            continue
        plan = frame_plan(inp, VISION)
        assert plan.num_frames == n
        theirs = torch.linspace(0, total - 1, n).round().long()  # float32: within one frame of ours
        assert (theirs - torch.tensor(plan.indices)).abs().max() <= 1


# --------------------------------------------------------------------------- files


av = pytest.importorskip("av")
from megatron_apbv.models.video import (  # noqa: E402
    decode_frames,
    probe_video,
    resize_frames,
    synthetic_video,
    write_video,
)


def full_decode(path) -> torch.Tensor:
    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".mkv", "mpeg4")])
def test_seek_decoding_equals_full_decode(tmp_path, suffix, codec):
    """libx264 has B-frames (presentation order != decoding order); .mkv has no frame count in its header."""
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} unavailable")
    path = tmp_path / f"clip{suffix}"
    source = synthetic_video(45, 32, 48, seed=3)
    write_video(path, source, fps=5, codec=codec, gop=6)
    full = full_decode(path)
    assert probe_video(path) == VideoSource(total_frames=45, fps=5.0, height=32, width=48)
    for indices in ([0], [44], [0, 11, 22, 33, 44], [5, 5, 4, 40, 17, 18, 19], list(range(45)), [6, 12, 18, 24]):
        assert torch.equal(decode_frames(path, indices), full[indices]), indices
    with pytest.raises(ValueError, match="past the end"):
        decode_frames(path, [45])


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_decodes_its_share(tmp_path, world):
    """build_prompt(share=(rank, world)) holds exactly the frames of the rank's temporal groups, pixel-equal."""
    from megatron_apbv.models.inputs import build_prompt
    from megatron_apbv.models.vision import frame_share

    path = tmp_path / "clip.mp4"
    write_video(path, synthetic_video(50, 40, 60, seed=4), fps=10, gop=5)
    cfg = load_config(None, [
        "apbv.anchor=8", "input.kind=video", f"input.video_path={path}", "input.fps=2.2", "input.min_pixels=784",
        "input.max_pixels=3136", "model.mrope_section=[2, 3, 3]",
    ])
    plan = cfg.input.frame_plan(cfg.vision)
    assert plan.num_frames == 10 and plan.size == (28, 56)  # 5 s at 2.2 fps = 11 -> 10; 40 x 60 -> 1 x 2 tokens
    whole = build_prompt(cfg)
    reference = resize_frames(full_decode(path)[plan.indices], plan.size)
    assert torch.equal(whole.frames, reference) and not whole.shared
    covered = []
    for rank in range(world):
        prompt = build_prompt(cfg, share=(rank, world))
        first, last = frame_share(plan.num_frames, 2, world, rank)
        assert torch.equal(prompt.frames, reference[first:last])
        assert torch.equal(prompt.input_ids, whole.input_ids) and torch.equal(prompt.position_ids, whole.position_ids)
        covered += range(first, last)
    assert covered == list(range(plan.num_frames))
    # the temporal RoPE step comes from the sampled fps: 2 frames per group at 2.0 fps = 1 s per group
    assert plan.second_per_grid_ts == pytest.approx(1.0)
    step = cfg.vision.tokens_per_second * plan.second_per_grid_ts
    video_t = whole.position_ids[0, whole.video.start : whole.video.stop].reshape(plan.groups, -1)
    assert video_t[:, 0].tolist() == [cfg.input.system_tokens + int(g * step) for g in range(plan.groups)]


def test_video_file_config(tmp_path):
    path = tmp_path / "clip.mkv"
    write_video(path, synthetic_video(12, 32, 32, seed=5), fps=4, codec="mpeg4")
    cfg = load_config(None, ["apbv.anchor=8", "input.kind=video", f"input.video_path={path}", "input.frame_size=[28, 28]"])
    assert cfg.input.source == VideoSource(total_frames=12, fps=4.0, height=32, width=32)
    assert cfg.input.frame_plan(cfg.vision).num_frames == 6  # 3 s at 2 fps
    with pytest.raises(ConfigError, match="input.source"):
        load_config(None, ["apbv.anchor=8", "input.kind=video", f"input.video_path={path}", "input.source={total_frames: 3}"])
    with pytest.raises(ConfigError, match="input.video_path.*no such file"):
        load_config(None, ["apbv.anchor=8", "input.kind=video", f"input.video_path={tmp_path / 'nope.mp4'}"])
    one = tmp_path / "one.mkv"
    write_video(one, synthetic_video(1, 32, 32, seed=5), fps=4, codec="mpeg4")
    with pytest.raises(ConfigError, match="input.video_frames"):
        load_config(None, ["apbv.anchor=8", "input.kind=video", f"input.video_path={one}"])


def test_hour_long_video_decodes_in_time_of_its_sampled_frames(tmp_path):
    """A 1-hour video (1 fps, keyframe every 2 s, 32 x 32) sampled to 16 frames decodes in about the time of a
    32-frame video sampled to 16 frames: the cost follows the frames sampled, not the length (decoding all
    3600 frames takes ~100x longer). Best CPU time of 7 interleaved runs each."""
    hour, short = tmp_path / "hour.mkv", tmp_path / "short.mkv"
    clip = synthetic_video(120, 32, 32, seed=6)
    write_video(hour, clip.repeat(30, 1, 1, 1), fps=1, codec="mpeg4", gop=2)  # 3600 frames, under a second
    write_video(short, clip[:32], fps=1, codec="mpeg4", gop=2)
    cfgs = {
        name: load_config(None, ["apbv.anchor=8", "input.kind=video", f"input.video_path={p}", "input.max_frames=16",
                                 "input.frame_size=[28, 28]"])
        for name, p in (("hour", hour), ("short", short))
    }
    plans = {name: cfg.input.frame_plan(cfg.vision) for name, cfg in cfgs.items()}
    assert plans["hour"].duration_seconds == 3600 and plans["short"].duration_seconds == 32
    assert plans["hour"].num_frames == plans["short"].num_frames == 16

    def cpu_seconds(path, indices):
        start = time.process_time()  # CPU time: other processes on a loaded machine do not count
        frames = decode_frames(path, indices)
        return time.process_time() - start, frames

    runs = {"hour": [], "short": []}
    for _ in range(7):  # interleaved, the best of each
        for name, path in (("hour", hour), ("short", short)):
            runs[name].append(cpu_seconds(path, plans[name].indices))
    long_s, long_frames = min(runs["hour"], key=lambda r: r[0])
    short_s = min(r[0] for r in runs["short"])
    expected = clip[[i % 120 for i in plans["hour"].indices]]
    assert (long_frames.float() - expected.float()).abs().mean() < 6  # the right frames, up to the codec
    assert long_s < 5 * short_s, (long_s, short_s)
