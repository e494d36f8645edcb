"""The segment-batched vision attention equals transformers' per-segment attention (same tower, same weights)."""

from __future__ import annotations

import copy

import torch

from megatron_apbv.models.vision import encode_groups, patchify_for
from megatron_apbv.models.vision_attention import batch_vision_segments, build_transformers_tower, segment_attention


def test_batched_tower_matches_transformers_tower():
    # window 56 px = 4 patches: windows of 16 patches, cut at the 10 x 14 grid's edges (unequal segments)
    tower = build_transformers_tower(dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=24,
                                    window_size=56, fullatt_block_indexes=[1]), seed=3)
    frames = torch.randint(0, 256, (4, 140, 196, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    patches, grid = patchify_for(tower.config, frames)
    ref = encode_groups(tower, patches, grid, grid.groups)
    got = encode_groups(batch_vision_segments(copy.deepcopy(tower)), patches, grid, grid.groups)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_segment_attention_against_a_loop():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(23, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 5, 5, 12, 23])  # an empty segment, unequal lengths
    got = segment_attention(q, k, v, cu, 0.3)
    ref = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), scale=0.3).transpose(0, 1)
        for a, b in ((0, 5), (5, 12), (12, 23))])
    torch.testing.assert_close(got, ref)


def test_batched_tower_matches_transformers_tower_gpu():
    """The same on the GPU image's transformers release, bf16 (skipped without CUDA)."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tower = build_transformers_tower(dict(depth=4, hidden_size=160, num_heads=2, intermediate_size=64, out_hidden_size=24,
                                    window_size=112, fullatt_block_indexes=[1, 3]), seed=3, device="cuda",
                               dtype=torch.bfloat16)
    frames = torch.randint(0, 256, (4, 252, 364, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    patches, grid = patchify_for(tower.config, frames)
    ref = encode_groups(tower, patches, grid, grid.groups).float()
    got = encode_groups(batch_vision_segments(copy.deepcopy(tower)), patches, grid, grid.groups).float()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
