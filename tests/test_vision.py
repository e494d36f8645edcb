"""Parallel vision encoding: patch layout, grid items, distributed = single-process, scatter into ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from megatron_apbv.apbv.layout import SequenceLayout, Span  # noqa: E402
from megatron_apbv.models.vision import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    encode_frames,
    encode_frames_distributed,
    encode_groups,
    frame_share,
    insert_video_embeddings,
    patchify,
    patchify_for,
    scatter_into_local,
    split_groups,
    vision_grid,
)
from megatron_apbv.models.vision_tower import build_vision_tower  # noqa: E402
from tests.distributed_utils import run_on_ranks  # noqa: E402

PATCH, TP, MERGE = 2, 2, 2
HEIGHT, WIDTH = 16, 24  # 8 x 12 patches, 4 x 6 tokens per temporal group, 2 x 3 windows of 2 x 2 tokens


def tiny_tower():
    """Our tower, depth 2 (one windowed layer, one full-attention layer), hidden 32; weights large enough to matter."""
    tower = build_vision_tower(
        dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            patch_size=PATCH,
            temporal_patch_size=TP,
            spatial_merge_size=MERGE,
            window_size=8,  # window of 8 / merge / patch = 2 x 2 merged tokens
            out_hidden_size=24,
            fullatt_block_indexes=[1],
        ),
        seed=0,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tower.state_dict().values():  # transformers' tensors (views; the MLP padding stays zero)
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    return tower


def frames_of(num_frames: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_frames, HEIGHT, WIDTH, 3), generator=gen, dtype=torch.uint8)


# --------------------------------------------------------------------------- patch layout


def loop_patchify(frames: torch.Tensor) -> torch.Tensor:
    """Independent reference: explicit loops over groups, merge blocks and patches."""
    x = (frames.double() / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64)) / torch.tensor(CLIP_STD, dtype=torch.float64)
    x = x.permute(0, 3, 1, 2)  # T, C, H, W
    if x.shape[0] % TP:
        x = torch.cat([x] + [x[-1:]] * (TP - x.shape[0] % TP))
    rows = []
    for g in range(x.shape[0] // TP):
        for by in range(HEIGHT // (PATCH * MERGE)):
            for bx in range(WIDTH // (PATCH * MERGE)):
                for iy in range(MERGE):
                    for ix in range(MERGE):
                        y0 = (by * MERGE + iy) * PATCH
                        x0 = (bx * MERGE + ix) * PATCH
                        patch = x[g * TP : (g + 1) * TP, :, y0 : y0 + PATCH, x0 : x0 + PATCH]  # tp, C, p, p
                        rows.append(patch.permute(1, 0, 2, 3).flatten())
    return torch.stack(rows).float()


@pytest.mark.parametrize("num_frames", [1, 2, 5])
def test_patchify_matches_loop_reference(num_frames):
    frames = frames_of(num_frames)
    patches, grid = patchify(frames, patch_size=PATCH, temporal_patch_size=TP, merge_size=MERGE)
    assert grid.groups == -(-num_frames // TP) and (grid.height, grid.width) == (HEIGHT // PATCH, WIDTH // PATCH)
    assert patches.shape == (grid.groups * grid.patches_per_group, 3 * TP * PATCH * PATCH)
    torch.testing.assert_close(patches, loop_patchify(frames), atol=1e-5, rtol=0)


def test_patchify_matches_hf_image_processor():
    """HF's own Qwen2-VL image processor (PIL backend, no torchvision): each image is a frame tiled over time."""
    try:  # transformers 5: the PIL/numpy backend (the default one needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as Proc,
        )
    except ImportError:
        try:  # transformers 4.x: the slow (numpy) processor
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
                Qwen2VLImageProcessor as Proc,
            )
        except ImportError as e:  # e.g. Pillow missing: the loop reference above still pins the layout
            pytest.skip(f"HF Qwen2-VL image processor unavailable without torchvision/Pillow: {e}")
    frames = frames_of(3, seed=5)
    proc = Proc(patch_size=PATCH, temporal_patch_size=TP, merge_size=MERGE)
    out = proc(images=[f.numpy() for f in frames], do_resize=False, return_tensors="pt")
    tiled = frames.repeat_interleave(TP, dim=0)  # every frame repeated TP times = one temporal group per image
    patches, grid = patchify(tiled, patch_size=PATCH, temporal_patch_size=TP, merge_size=MERGE)
    assert out["image_grid_thw"].tolist() == [[1, grid.height, grid.width]] * 3
    torch.testing.assert_close(patches, out["pixel_values"].float(), atol=1e-5, rtol=0)


def test_grid_errors_and_counts():
    tower = tiny_tower()
    grid = vision_grid(tower.config, 7, (HEIGHT, WIDTH))
    assert (grid.groups, grid.tokens_per_group, grid.num_tokens, grid.token_grid) == (4, 24, 96, (4, 4, 6))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vision_grid(tower.config, 2, (HEIGHT + 2, WIDTH))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify_for(tower.config, torch.zeros(2, HEIGHT, WIDTH - 2, 3, dtype=torch.uint8))
    assert split_groups(5, 3) == ((0, 2), (2, 4), (4, 5))
    assert split_groups(1, 3) == ((0, 1), (1, 1), (1, 1))


def test_one_item_per_group_equals_one_video_item():
    """The documented choice: t items [1, h, w] compute what one item [t, h, w] does (attention is per group)."""
    tower = tiny_tower()
    patches, grid = patchify_for(tower.config, frames_of(6))
    per_group = encode_groups(tower, patches, grid, grid.groups)
    with torch.no_grad():
        out = tower(patches, grid_thw=torch.tensor([[grid.groups, grid.height, grid.width]]))
    whole = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(per_group, whole, atol=1e-5, rtol=0)
    # And groups really are independent: encoding a group alone gives its rows.
    one = encode_groups(tower, patches[grid.patches_per_group : 2 * grid.patches_per_group], grid, 1)
    torch.testing.assert_close(one, per_group[grid.tokens_per_group : 2 * grid.tokens_per_group], atol=1e-5, rtol=0)
    assert per_group.abs().mean() > 0.1  # not a degenerate tower


def test_groups_encoded_in_bounded_calls():
    """A video larger than one call's patch budget is encoded in calls of whole groups: the same embeddings."""
    tower = tiny_tower()
    patches, grid = patchify_for(tower.config, frames_of(10))  # 5 groups of 96 patches
    whole = encode_groups(tower, patches, grid, grid.groups)
    calls = []
    handle = tower.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        chunked = encode_groups(tower, patches, grid, grid.groups, max_patches=2 * 96 + 50)
        single = encode_groups(tower, patches, grid, grid.groups, max_patches=10)  # below one group: one a call
    finally:
        handle.remove()
    assert calls == [192, 192, 96] + [96] * 5
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(single, whole, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- distributed


def _frame_counts(world: int) -> list[int]:
    # Temporal-group counts 1, W-1, W+1 (as frames), plus a count that needs temporal padding.
    groups = sorted({1, max(world - 1, 1), world + 1})
    return [g * TP for g in groups] + [(world + 1) * TP - 1]


def _distributed_worker(rank, world):
    tower = tiny_tower()
    results, max_diff = [], torch.zeros(())
    for n in _frame_counts(world):
        frames = frames_of(n, seed=n)
        reference = encode_frames(tower, frames)
        # Poison every frame this rank does not own: the rank must read its own temporal groups only.
        grid = vision_grid(tower.config, n, (HEIGHT, WIDTH))
        start, stop = split_groups(grid.groups, world)[rank]
        poisoned = torch.full(frames.shape, float("nan"))
        own = slice(start * TP, min(stop * TP, n))
        poisoned[own] = frames[own].float()
        if stop * TP > n and stop > start:  # the padded last group repeats the last real frame
            poisoned[n - 1] = frames[n - 1].float()
        got = encode_frames_distributed(tower, poisoned, group=dist.group.WORLD)
        assert got.shape == reference.shape == (grid.num_tokens, 24), (got.shape, reference.shape)
        max_diff = torch.maximum(max_diff, (got - reference).abs().max())
        # Only the rank's own frames (what a rank decodes from a file): the same embeddings.
        first, last = frame_share(n, TP, world, rank)
        assert (first, last) == (own.start, own.stop) if stop > start else first == last
        shared = encode_frames_distributed(tower, frames[first:last], group=dist.group.WORLD, total_frames=n)
        max_diff = torch.maximum(max_diff, (shared - reference).abs().max())
        results.append((n, got))
    dist.all_reduce(max_diff, op=dist.ReduceOp.MAX)
    return float(max_diff), results


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_encoding_equals_single_process(world):
    max_diff, results = run_on_ranks(world, _distributed_worker)
    assert max_diff <= 1e-5
    tower = tiny_tower()
    for n, got in results:
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, encode_frames(tower, frames_of(n, seed=n)), atol=1e-5, rtol=0)


def test_no_process_group_is_single_process():
    tower = tiny_tower()
    frames = frames_of(4)
    torch.testing.assert_close(encode_frames_distributed(tower, frames), encode_frames(tower, frames))


# --------------------------------------------------------------------------- scatter


@pytest.mark.parametrize("world,zigzag", [(1, True), (2, True), (3, True), (3, False), (4, True)])
def test_scatter_into_local_covers_the_video(world, zigzag):
    system, video_len, query = 5, 37, 6
    seq = SequenceLayout(prompt_len=system + video_len + query, anchor_len=9, query_len=query, world_size=world, zigzag=zigzag)
    video = Span(system, system + video_len)
    emb = torch.randn(video_len, 4)
    seen = torch.zeros(video_len, dtype=torch.long)
    for layout in seq.ranks():
        gi = layout.global_indices
        rows, values = scatter_into_local(emb, gi, video)
        assert torch.equal(rows, torch.nonzero((gi >= video.start) & (gi < video.stop)).flatten())
        torch.testing.assert_close(values, emb[gi[rows] - video.start])
        seen[gi[rows] - video.start] += 1
        tokens = torch.zeros(layout.local_len, 2, 4)
        filled = insert_video_embeddings(tokens, emb, gi, (video.start, video.stop))
        torch.testing.assert_close(filled[rows], values[:, None].expand(-1, 2, -1))
        others = torch.ones(layout.local_len, dtype=torch.bool)
        others[rows] = False
        assert filled[others].abs().sum() == 0
    # Every video token lands on some rank; anchor video tokens (here 4) on every rank.
    assert (seen >= 1).all()
    assert (seen[: seq.anchor_len - system] == world).all()
    with pytest.raises(ValueError, match="video span"):
        scatter_into_local(emb[:-1], seq.rank(0).global_indices, video)


def test_video_to_local_tokens_end_to_end():
    """synthetic frames -> tower -> [system | video | question] with the tower's token grid -> every rank's rows."""
    from megatron_apbv.models.video import synthetic_video

    tower = tiny_tower()
    frames = synthetic_video(5, HEIGHT, WIDTH, seed=2)
    emb = encode_frames(tower, frames)
    grid = vision_grid(tower.config, frames.shape[0], (HEIGHT, WIDTH))
    system, query = 4, 5
    assert emb.shape[0] == grid.num_tokens == 3 * 4 * 6
    video = Span(system, system + grid.num_tokens)
    prompt_len = system + grid.num_tokens + query
    ids = torch.zeros(prompt_len, dtype=torch.long)
    ids[video.start : video.stop] = 99  # the video placeholders
    seq = SequenceLayout(prompt_len, anchor_len=8, query_len=query, world_size=3)
    full = torch.zeros(prompt_len, emb.shape[1])
    for layout in seq.ranks():
        rows, values = scatter_into_local(emb, layout.global_indices, video)
        assert (ids[layout.global_indices[rows]] == 99).all()
        full[layout.global_indices[rows]] = values
    torch.testing.assert_close(full[video.start : video.stop], emb)
