"""Parallel vision encoding over the APB-V group (docs/design.md §6).

The vision tower is Qwen2.5-VL's: ours (:mod:`megatron_apbv.models.vision_tower`),
or ``transformers``' ``Qwen2_5_VisionTransformerPretrainedModel`` (the reference
in tests, :func:`megatron_apbv.models.vision_attention.build_transformers_tower`);
the functions here take either. Its forward takes flattened patches
``[num_patches, C * temporal_patch * patch * patch]`` and ``grid_thw``
``[num_items, 3]`` (temporal groups, patch rows, patch columns per item) and
returns one embedding per merged ``merge x merge`` patch group.

Frames go in as ``[T, H, W, 3]`` (RGB, values 0..255). ``patchify`` turns them
into the tower's patch layout the way the Hugging Face Qwen2-VL video processor
does: rescale to [0, 1], normalise with the CLIP mean/std, pad ``T`` to a
multiple of ``temporal_patch_size`` by repeating the last frame, then order
patches temporal group, merge-block row, merge-block column, row inside the
block, column inside the block, each patch flattened as (channel, time, y, x).

Splitting. The unit of work is one *temporal group* (``temporal_patch_size``
consecutive frames, one row of video tokens in time). Groups are split over the
ranks of the group by the ``torch.tensor_split`` rule (earlier ranks one more);
ranks past the number of groups encode nothing. Each rank encodes its own groups,
the per-rank embeddings are padded to the largest share, all-gathered, trimmed
and concatenated in frame order. Every rank computes every share from the frame
count alone, so no sizes are exchanged.

Why each temporal group is its own grid item. Qwen2.5-VL's tower attends inside
windows of one temporal group (most layers) and over one temporal group in its
full-attention layers: ``cu_seqlens`` has one segment per temporal group of each
grid item, and the 2-D rotary positions and the windows restart for each group.
Encoding the video as one item ``[t, h, w]`` and as ``t`` items ``[1, h, w]`` is
therefore the same computation; we pass ``t`` rows ``[1, h, w]`` so that the
independence of the groups is explicit in the input and not a property of the
current tower implementation. The distributed result equals single-process
encoding of the same grid items up to float summation order (bit-exact on CPU in
practice, <= 1e-5 in fp32 by test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_apbv.apbv.layout import Span

# The Qwen2-VL / Qwen2.5-VL processors normalise with the OpenAI CLIP statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionGrid:
    """Grid of one video for the tower: ``groups`` temporal groups of ``height x width`` patches."""

    groups: int
    height: int  # patch rows
    width: int  # patch columns
    merge: int  # spatial_merge_size

    @property
    def patches_per_group(self) -> int:
        return self.height * self.width

    @property
    def tokens_per_group(self) -> int:
        return self.patches_per_group // (self.merge * self.merge)

    @property
    def num_tokens(self) -> int:
        return self.groups * self.tokens_per_group

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """``(t, h, w)`` of the video tokens (the 3-D RoPE grid)."""
        return self.groups, self.height // self.merge, self.width // self.merge

    def grid_thw(self, groups: Optional[int] = None) -> torch.Tensor:
        """``grid_thw`` rows ``[1, h, w]``, one per temporal group (see the module docstring)."""
        n = self.groups if groups is None else groups
        return torch.tensor([[1, self.height, self.width]] * n, dtype=torch.long).reshape(n, 3)


def _cfg(config, name):
    value = getattr(config, name)
    if isinstance(value, (list, tuple)):  # transformers allows (h, w) patch sizes; we need square ones
        if len(set(value)) != 1:
            raise ValueError(f"vision config {name}={value}: only square / uniform sizes are supported")
        value = value[0]
    return int(value)


def vision_grid(config, num_frames: int, size: tuple[int, int]) -> VisionGrid:
    """The tower grid for ``num_frames`` frames of ``size = (H, W)`` pixels.

    ``H`` and ``W`` must be multiples of ``patch_size * spatial_merge_size``
    (resize the frames first, e.g. ``video.load_video(..., size=...)``).
    """
    patch, merge, tp = _cfg(config, "patch_size"), _cfg(config, "spatial_merge_size"), _cfg(config, "temporal_patch_size")
    height, width = size
    factor = patch * merge
    if height % factor or width % factor or height < 1 or width < 1:
        raise ValueError(
            f"frame size {height}x{width} must be a positive multiple of patch_size * spatial_merge_size = {factor}"
        )
    if num_frames < 0:
        raise ValueError(f"num_frames={num_frames} must be >= 0")
    return VisionGrid(groups=-(-num_frames // tp), height=height // patch, width=width // patch, merge=merge)


def pad_frames(frames: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    """Repeat the last frame until ``T`` is a multiple of ``temporal_patch_size`` (as the HF processor)."""
    pad = -frames.shape[0] % temporal_patch_size
    if pad and frames.shape[0]:
        frames = torch.cat([frames, frames[-1:].expand(pad, *frames.shape[1:])])
    return frames


def patchify(
    frames: torch.Tensor,
    *,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[torch.Tensor, VisionGrid]:
    """``[T, H, W, C]`` frames (values 0..255) -> fp32 patches ``[groups * h * w, C * tp * p * p]`` and the grid."""
    if frames.dim() != 4:
        raise ValueError(f"frames must be [T, H, W, C], got shape {tuple(frames.shape)}")
    T, H, W, C = frames.shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    if H % (p * m) or W % (p * m):
        raise ValueError(f"frame size {H}x{W} must be a multiple of patch_size * merge_size = {p * m}")
    if len(mean) != C or len(std) != C:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {C} channels")
    x = frames.to(torch.float32) / 255.0
    x = (x - x.new_tensor(mean)) / x.new_tensor(std)  # on the frames' device (CPU or GPU)
    x = pad_frames(x.permute(0, 3, 1, 2), tp)  # [T', C, H, W]
    groups, gh, gw = x.shape[0] // tp, H // p, W // p
    x = x.reshape(groups, tp, C, gh // m, m, p, gw // m, m, p)
    # -> groups, block row, block col, row in block, col in block | C, time, y, x
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(groups * gh * gw, C * tp * p * p)
    return patches, VisionGrid(groups=groups, height=gh, width=gw, merge=m)


def patchify_for(config, frames: torch.Tensor, **norm) -> tuple[torch.Tensor, VisionGrid]:
    """:func:`patchify` with the sizes of a ``Qwen2_5_VLVisionConfig``."""
    if int(getattr(config, "in_channels", 3)) != frames.shape[-1]:
        raise ValueError(f"frames have {frames.shape[-1]} channels, the tower expects {config.in_channels}")
    return patchify(
        frames,
        patch_size=_cfg(config, "patch_size"),
        temporal_patch_size=_cfg(config, "temporal_patch_size"),
        merge_size=_cfg(config, "spatial_merge_size"),
        **norm,
    )


def _tower_param(tower) -> torch.Tensor:
    return next(tower.parameters())


# Temporal groups are encoded in calls of at most this many patches (whole groups; at least one group a call):
# 64 frames at 1440p (594,048 patches) take about 20 GB of activations in the bf16 7B tower, so a long or 4K
# video does not need all its activations at once. Groups are independent, so the split changes nothing.
MAX_PATCHES_PER_CALL = 600_000


def encode_groups(tower, patches: torch.Tensor, grid: VisionGrid, groups: int, *, device=None,
                  max_patches: int = MAX_PATCHES_PER_CALL) -> torch.Tensor:
    """Run the tower on ``groups`` temporal groups of patches, one grid item each: ``[groups * tokens, out_hidden]``.

    The groups go through the tower in calls of at most ``max_patches`` patches (whole groups).
    """
    param = _tower_param(tower)
    device = param.device if device is None else torch.device(device)
    out_hidden = int(tower.config.out_hidden_size)
    if groups == 0:
        return torch.empty(0, out_hidden, dtype=param.dtype, device=device)
    if patches.shape[0] != groups * grid.patches_per_group:
        raise ValueError(f"{patches.shape[0]} patches for {groups} groups of {grid.patches_per_group}")
    per_call = max(1, max_patches // grid.patches_per_group)
    chunks = []
    for start in range(0, groups, per_call):
        count = min(per_call, groups - start)
        part = patches[start * grid.patches_per_group : (start + count) * grid.patches_per_group]
        with torch.no_grad():
            out = tower(part.to(device=device, dtype=param.dtype), grid_thw=grid.grid_thw(count).to(device))
        # transformers >= 5 returns a model output (merged tokens in pooler_output); 4.x returns the tensor.
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        if emb.shape != (count * grid.tokens_per_group, out_hidden):
            raise RuntimeError(
                f"vision tower returned {tuple(emb.shape)}, expected {(count * grid.tokens_per_group, out_hidden)}"
            )
        chunks.append(emb)
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def split_groups(num_groups: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` temporal groups of every rank, by the ``tensor_split`` rule (earlier ranks one more)."""
    if world_size < 1 or num_groups < 0:
        raise ValueError(f"split_groups({num_groups}, {world_size})")
    base, extra = divmod(num_groups, world_size)
    out, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return tuple(out)


def encode_frames(tower, frames: torch.Tensor, *, device=None, **norm) -> torch.Tensor:
    """Single-process encoding of all frames (the reference of :func:`encode_frames_distributed`)."""
    patches, grid = patchify_for(tower.config, frames, **norm)
    return encode_groups(tower, patches, grid, grid.groups, device=device)


def encode_frames_distributed(
    tower, frames: torch.Tensor, *, group=None, device=None, total_frames: Optional[int] = None, **norm
) -> torch.Tensor:
    """Encode ``[T, H, W, 3]`` frames over the ranks of ``group``: ``[num_video_tokens, out_hidden]`` on every rank.

    Every rank passes the same frames (or at least frames of the same shape with
    its own share filled in: a rank reads only its temporal groups), or, with
    ``total_frames`` (the video's frame count), only the frames of its own share
    (:func:`frame_share`). Rank ``r`` encodes groups ``split_groups(G, W)[r]``; the
    results are all-gathered over ``group`` on ``device`` (the tower's device by
    default: CPU for gloo, CUDA for NCCL) and concatenated in frame order. Without
    an initialised process group (and ``group=None``) this is :func:`encode_frames`.
    """
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return encode_frames(tower, frames, device=device, **norm)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    cfg = tower.config
    tp = _cfg(cfg, "temporal_patch_size")
    count = frames.shape[0] if total_frames is None else total_frames
    grid = vision_grid(cfg, count, tuple(frames.shape[1:3]))
    shares = split_groups(grid.groups, world)
    start, stop = shares[rank]
    if total_frames is None:
        mine = pad_frames(frames, tp)[start * tp : stop * tp]
    else:
        first, last = frame_share(total_frames, tp, world, rank)
        if frames.shape[0] != last - first:
            raise ValueError(f"rank {rank} passed {frames.shape[0]} frames; its share is frames [{first}, {last})")
        mine = pad_frames(frames, tp)
    if stop > start:
        patches, local_grid = patchify_for(cfg, mine, **norm)
        assert local_grid.groups == stop - start
        local = encode_groups(tower, patches, grid, stop - start, device=device)
    else:
        local = encode_groups(tower, None, grid, 0, device=device)
    if world == 1:
        return local
    rows = [(b - a) * grid.tokens_per_group for a, b in shares]
    buf = local.new_zeros(max(rows), local.shape[1])
    buf[: local.shape[0]] = local
    gathered = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(gathered, buf, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, rows)])


def frame_share(num_frames: int, temporal_patch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[first, last)`` frames of ``rank``'s temporal groups (:func:`split_groups`); the last group may be short."""
    groups = -(-num_frames // temporal_patch_size)
    start, stop = split_groups(groups, world_size)[rank]
    return min(start * temporal_patch_size, num_frames), min(stop * temporal_patch_size, num_frames)


def scatter_into_local(
    embeddings: torch.Tensor, global_indices: torch.Tensor, video: Span | tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank's video tokens: ``(local_rows, rows_embeddings)``.

    ``embeddings`` are the ``[num_video_tokens, hidden]`` video embeddings of the
    whole prompt, ``global_indices`` the global index of each local token
    (``RankLayout.global_indices``) and ``video`` the global ``[start, stop)`` of
    the video tokens. ``local_rows`` are the local positions that are video tokens
    (ascending), ``rows_embeddings[i]`` is the embedding for ``local_rows[i]``.
    """
    start, stop = (video.start, video.stop) if isinstance(video, Span) else (int(video[0]), int(video[1]))
    if embeddings.shape[0] != stop - start:
        raise ValueError(f"{embeddings.shape[0]} video embeddings for a video span of {stop - start} tokens")
    gi = global_indices.to(torch.long)
    local_rows = torch.nonzero((gi >= start) & (gi < stop)).flatten()
    source = (gi[local_rows] - start).to(embeddings.device)
    return local_rows, embeddings[source]


def insert_video_embeddings(
    token_embeddings: torch.Tensor,
    embeddings: torch.Tensor,
    global_indices: torch.Tensor,
    video: Span | tuple[int, int],
) -> torch.Tensor:
    """Replace the rank's video-token rows of seq-first ``token_embeddings`` ``[s, ..., hidden]`` (new tensor).

    Middle dimensions (e.g. Megatron's batch) are broadcast: every sequence of the
    batch gets the same video.
    """
    rows, values = scatter_into_local(embeddings, global_indices, video)
    out = token_embeddings.clone()
    shape = (values.shape[0],) + (1,) * (out.dim() - 2) + (values.shape[-1],)
    out[rows.to(out.device)] = values.to(out.dtype).reshape(shape).expand(-1, *out.shape[1:])
    return out
