"""Video files and prompts: PyAV round trip, uniform sampling, errors, prompt ids and positions."""

from __future__ import annotations

import pytest
import torch

from megatron_apbv.models.video import (
    VideoError,
    load_video,
    resize_frames,
    synthetic_video,
    write_video,
)
from megatron_apbv.runtime.video_sampling import frame_indices

T, H, W = 12, 32, 48


def test_synthetic_video_is_deterministic():
    a = synthetic_video(T, H, W, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (T, H, W, 3)
    assert torch.equal(a, synthetic_video(T, H, W, seed=3))
    assert not torch.equal(a, synthetic_video(T, H, W, seed=4))
    assert not torch.equal(a[0], a[1])  # it moves
    assert a.float().std() > 20  # and has content


def test_frame_indices_are_uniform():
    assert frame_indices(12, 5) == [0, 3, 6, 8, 11]  # 2.75 * (0..4): 5.5 rounds to even
    assert frame_indices(10, 1) == [0]
    assert frame_indices(1, 3) == [0, 0, 0]
    for total, num in [(100, 7), (301, 16), (9, 9), (5, 8)]:
        idx = torch.tensor(frame_indices(total, num))
        assert idx[0] == 0 and idx[-1] == total - 1 and len(idx) == num
        steps = idx.diff()
        assert (steps >= 0).all() and steps.max() - steps.min() <= 1  # evenly spaced up to rounding
    with pytest.raises(ValueError):
        frame_indices(0, 3)


@pytest.mark.parametrize("suffix,codec", [(".mp4", None), (".mkv", "mpeg4")])
def test_round_trip(tmp_path, suffix, codec):
    """Write a real file, decode it back. The .mkv has no frame count in its header (probing counts)."""
    pytest.importorskip("av")
    source = synthetic_video(T, H, W, seed=7)
    path = tmp_path / f"clip{suffix}"
    write_video(path, source, fps=8, codec=codec)
    frames = load_video(path, num_frames=T, size=(H, W))
    assert frames.dtype == torch.uint8 and frames.shape == (T, H, W, 3)
    err = (frames.float() - source.float()).abs()
    assert err.mean() < 6, err.mean()
    # Frame order is kept: each decoded frame is closest to its own source frame.
    dist = (frames.float()[:, None] - source.float()[None]).abs().mean(dim=(2, 3, 4))
    assert torch.equal(dist.argmin(dim=1), torch.arange(T))

    # Sampling picks round(linspace) frames; resizing is torch's antialiased bicubic.
    sub = load_video(path, num_frames=5, size=(16, 24))
    assert sub.shape == (5, 16, 24, 3)
    torch.testing.assert_close(sub, resize_frames(frames[frame_indices(T, 5)], (16, 24)), atol=1, rtol=0)
    want = resize_frames(source[frame_indices(T, 5)], (16, 24))
    assert (sub.float() - want.float()).abs().mean() < 6
    up = load_video(path, num_frames=20, size=(H, W))  # more frames than the video has: repeats
    assert up.shape[0] == 20 and torch.equal(up[-1], frames[-1])


def test_missing_file_raises(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match="nope.mp4") as info:
        load_video(path, num_frames=4, size=(H, W))
    assert isinstance(info.value, ValueError) and "no such file" in str(info.value)
    with pytest.raises(VideoError, match="not a regular file"):
        load_video(tmp_path, num_frames=4, size=(H, W))


def test_garbage_file_raises(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "garbage.mp4"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(VideoError, match="garbage.mp4"):
        load_video(path, num_frames=4, size=(H, W))
    text = tmp_path / "notes.mkv"
    text.write_text("not a video at all\n" * 50)
    with pytest.raises(VideoError, match="notes.mkv"):
        load_video(text, num_frames=4, size=(H, W))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_zero_frame_file_raises(tmp_path, suffix):
    pytest.importorskip("av")
    path = tmp_path / f"empty{suffix}"
    write_video(path, synthetic_video(0, H, W, seed=0))
    assert path.exists()
    with pytest.raises(VideoError, match=f"empty{suffix}"):
        load_video(path, num_frames=4, size=(H, W))


def test_write_video_rejects_bad_frames(tmp_path):
    pytest.importorskip("av")
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", synthetic_video(2, 31, 48, seed=0))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", synthetic_video(2, H, W, seed=0).float())


