"""Position-id RoPE against an independent complex-number rotation."""

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_apbv.models.rope import PositionRotaryEmbedding, video_position_ids


def _rotate_reference(x, positions, base):
    """Rotate pairs (i, i + d/2) by angle pos * base^(-2i/d), as complex numbers, in float64."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * inv[None]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, None, :]
    return torch.cat([z.real, z.imag], -1)


def test_rope_of_global_positions_matches_reference():
    rope = PositionRotaryEmbedding(16, 10000.0)
    positions = torch.tensor([0, 5, 6, 7, 300, 301, 9999])  # non-contiguous, like a rank's layout
    x = torch.randn(len(positions), 1, 2, 16, dtype=torch.float64)
    out = _apply_rotary_pos_emb_bshd(x, rope(positions))
    assert torch.allclose(out, _rotate_reference(x, positions, 10000.0), atol=1e-10)


def test_local_slice_equals_slice_of_full_sequence():
    rope = PositionRotaryEmbedding(32, 1e6)
    full = rope(torch.arange(100))
    idx = torch.tensor([0, 1, 2, 40, 41, 90, 99])
    assert torch.equal(rope(idx), full[idx])


def test_mrope_with_equal_axes_is_1d_rope_and_sections_pick_axes():
    rope3 = PositionRotaryEmbedding(16, 10000.0, mrope_section=[2, 3, 3])
    rope1 = PositionRotaryEmbedding(16, 10000.0)
    pos = torch.arange(50)
    assert torch.equal(rope3(pos.expand(3, -1)), rope1(pos))
    t, h, w = torch.arange(5), torch.arange(5) * 2, torch.arange(5) * 3
    emb = rope3(torch.stack([t, h, w]))[:, 0, 0]
    inv = rope1.inv_freq
    assert torch.allclose(emb[:, :2], t.double()[:, None] * inv[:2])
    assert torch.allclose(emb[:, 2:5], h.double()[:, None] * inv[2:5])
    assert torch.allclose(emb[:, 5:8], w.double()[:, None] * inv[5:8])
    assert torch.equal(emb[:, 8:], emb[:, :8])


def test_video_position_ids():
    pos = video_position_ids(2, 2, (2, 3), 2)
    assert pos.shape == (3, 2 + 12 + 2)
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[:, 2].tolist() == [2, 2, 2]  # frame 0, row 0, col 0
    assert pos[:, 2 + 6 + 5].tolist() == [3, 3, 4]  # frame 1, row 1, col 2
    assert pos[:, -2].tolist() == [5, 5, 5]  # text resumes after the largest position


def test_video_time_interval_spaces_temporal_positions():
    pos = video_position_ids(1, 3, (1, 2), 1, time_interval=2.5)
    assert pos[0, 1:7].tolist() == [1, 1, 3, 3, 6, 6]  # floor(f * 2.5) + start
    assert pos[1, 1:7].tolist() == [1] * 6 and pos[2, 1:7].tolist() == [1, 2] * 3
    assert pos[:, -1].tolist() == [7, 7, 7]  # one past the largest position
