"""Single-process reference oracle for APB-V attention (docs/design.md §4).

Everything here is deliberately slow and explicit: the APB-V attention of one
layer is written as ordinary causal attention under an explicit boolean mask
``[kv_heads, N, N]`` over the whole prompt, built from the passing selections
of every virtual block. The distributed implementation must produce the same
output (up to floating-point error) as :func:`apbv_attention_reference`.

This module does not import any other project module on purpose: block
boundaries, selections and masks are all recomputed here from the
specification so that the oracle is independent of the code it checks.

Conventions
-----------
* ``q``: ``[N, heads, dim]``; ``k``: ``[N, kv_heads, dim]``; ``v``:
  ``[N, kv_heads, dim_v]``. RoPE is already applied.
* GQA: query head ``h`` uses KV head ``h // (heads // kv_heads)``.
* Anchor ``A = [0, a)``, query ``Q = [N - q, N)``, context ``[a, N - q)`` cut
  into ``2W`` (zigzag) or ``W`` (zigzag off) virtual blocks with the
  ``torch.tensor_split`` rule (earlier blocks one token longer; blocks may be
  empty). Virtual block ``j`` covers earlier tokens than block ``j + 1``.
* All arithmetic is done in float64; outputs are returned in ``q.dtype``.

Tie rule of the selection: among keys of one block with equal smoothed score
the key with the LOWER global position wins (a stable descending sort on the
smoothed score). Note that the max-pool smoothing itself creates plateaus of
equal scores (a local maximum is spread over up to ``window`` positions), so
ties are the norm, not the exception, and any implementation compared against
this oracle must use the same rule (or the comparison must be tie-aware).

(Over 400 lines on purpose: the oracle is self-contained, importing nothing from the package, so
that it stays independent of the code it checks.)
"""

from __future__ import annotations

import math
import numbers
from typing import List, Tuple

import torch

__all__ = [
    "apbv_block_bounds_reference",
    "dense_attention_reference",
    "apbv_passing_selection_reference",
    "apbv_mask_reference",
    "apbv_attention_reference",
    "masked_attention_reference",
]


# --------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_nonneg_int(name: str, value) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return int(value)


def _check_passing_len(passing_len):
    """Return passing_len as an int, or math.inf for exact mode."""
    if isinstance(passing_len, float) and math.isinf(passing_len) and passing_len > 0:
        return math.inf
    if not _is_int(passing_len):
        raise ValueError(
            "passing_len must be a non-negative int or float('inf'), "
            f"got {passing_len!r}"
        )
    if passing_len < 0:
        raise ValueError(f"passing_len must be non-negative, got {passing_len}")
    return int(passing_len)


def _check_window(window) -> int:
    if not _is_int(window) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}")
    return int(window)


def _check_world_size(world_size) -> int:
    if not _is_int(world_size):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return int(world_size)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> Tuple[int, int, int, int]:
    """Validate q/k shapes; return (N, heads, kv_heads, group)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(
            f"q must be a 3-D tensor [N, heads, dim], got shape "
            f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q)}"
        )
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(
            f"k must be a 3-D tensor [N, kv_heads, dim], got shape "
            f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k)}"
        )
    n, heads, dim = q.shape
    if k.shape[0] != n:
        raise ValueError(f"k has {k.shape[0]} tokens but q has {n}")
    if k.shape[2] != dim:
        raise ValueError(f"k head dim {k.shape[2]} differs from q head dim {dim}")
    kv_heads = k.shape[1]
    if kv_heads < 1 or heads < 1:
        raise ValueError(f"heads ({heads}) and kv_heads ({kv_heads}) must be >= 1")
    if heads % kv_heads != 0:
        raise ValueError(
            f"heads ({heads}) must be divisible by kv_heads ({kv_heads})"
        )
    return n, heads, kv_heads, heads // kv_heads


def _check_v(v: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 3:
        raise ValueError("v must be a 3-D tensor [N, kv_heads, dim_v]")
    if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1]:
        raise ValueError(
            f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} "
            "in tokens and kv_heads"
        )


def _scale(softmax_scale, dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(dim)
    return float(softmax_scale)


# --------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------


def apbv_block_bounds_reference(
    n: int, *, world_size: int, anchor_len: int, query_len: int, zigzag: bool = True
) -> List[Tuple[int, int]]:
    """Global ``[start, end)`` bounds of the virtual context blocks.

    The context ``[anchor_len, n - query_len)`` is cut into ``2 * world_size``
    blocks (zigzag) or ``world_size`` blocks (zigzag off) with the
    ``torch.tensor_split`` rule: with ``L`` context tokens and ``m`` blocks,
    the first ``L % m`` blocks hold ``L // m + 1`` tokens and the rest
    ``L // m``. Blocks may be empty (``start == end``). Block ``j`` always
    precedes block ``j + 1`` in sequence order.
    """
    n = _check_nonneg_int("N", n)
    world_size = _check_world_size(world_size)
    anchor_len = _check_nonneg_int("anchor_len", anchor_len)
    query_len = _check_nonneg_int("query_len", query_len)
    if anchor_len + query_len > n:
        raise ValueError(
            f"anchor_len + query_len ({anchor_len} + {query_len}) exceeds "
            f"the sequence length N={n}"
        )
    m = 2 * world_size if zigzag else world_size
    ctx = n - anchor_len - query_len
    base, extra = divmod(ctx, m)
    bounds = []
    start = anchor_len
    for j in range(m):
        length = base + (1 if j < extra else 0)
        bounds.append((start, start + length))
        start += length
    assert start == n - query_len
    return bounds


# --------------------------------------------------------------------------
# attention under an explicit mask
# --------------------------------------------------------------------------


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    softmax_scale=None,
) -> torch.Tensor:
    """Attention of every query head under a per-KV-head boolean mask.

    ``mask`` is ``[kv_heads, N, N]`` (``True`` = key visible to the row) or
    ``[N, N]`` (shared by all heads). Query head ``h`` uses KV head
    ``h // (heads // kv_heads)`` and that head's mask. Scores and softmax are
    in float64; every row must see at least one key. Returns
    ``[N, heads, dim_v]`` in ``q.dtype``.
    """
    n, heads, kv_heads, group = _check_qk(q, k)
    _check_v(v, k)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(kv_heads, n, n)
    if tuple(mask.shape) != (kv_heads, n, n):
        raise ValueError(
            f"mask must have shape [kv_heads, N, N] = {(kv_heads, n, n)}, "
            f"got {tuple(mask.shape)}"
        )
    mask = mask.to(torch.bool)
    if n > 0 and not bool(mask.any(dim=-1).all()):
        raise ValueError("mask has a row with no visible key")
    scale = _scale(softmax_scale, q.shape[-1])
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64)
    v64 = v.to(torch.float64)
    out = torch.empty(n, heads, v.shape[-1], dtype=torch.float64, device=q.device)
    for h in range(heads):
        g = h // group
        s = (q64[:, h, :] @ k64[:, g, :].T) * scale  # [N, N]
        s = s.masked_fill(~mask[g], float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, h, :] = p @ v64[:, g, :]
    return out.to(q.dtype)


def dense_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale=None
) -> torch.Tensor:
    """Dense causal attention over the whole sequence (the ground truth).

    ``q``: ``[N, heads, dim]``, ``k``/``v``: ``[N, kv_heads, dim]``; query head
    ``h`` uses KV head ``h // (heads // kv_heads)``. Row ``i`` sees keys
    ``t <= i``. Computed in float64, returned as ``q.dtype``, shape
    ``[N, heads, dim_v]``. Default ``softmax_scale`` is ``1 / sqrt(dim)``.
    """
    n, _, kv_heads, _ = _check_qk(q, k)
    _check_v(v, k)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return masked_attention_reference(
        q, k, v, causal.expand(kv_heads, n, n), softmax_scale=softmax_scale
    )


# --------------------------------------------------------------------------
# selection (docs/design.md §3 steps 1-2)
# --------------------------------------------------------------------------


SELECTION_RULES_REFERENCE = ("mean", "softmax", "max", "recent", "frame")


def _check_selection(selection, frame_len, recent_fraction) -> str:
    if selection not in SELECTION_RULES_REFERENCE:
        raise ValueError(f"selection must be one of {SELECTION_RULES_REFERENCE}, got {selection!r}")
    if not _is_int(frame_len) or frame_len < 1:
        raise ValueError(f"frame_len must be a positive int, got {frame_len!r}")
    if not (0.0 <= float(recent_fraction) <= 1.0):
        raise ValueError(f"recent_fraction must lie in [0, 1], got {recent_fraction!r}")
    return selection


def _raw_scores(q, k, query_len, selection, scale, bounds) -> torch.Tensor:
    """Unsmoothed per-key scores ``[kv_heads, N]`` (float64) of ``selection``.

    * ``mean`` / ``recent`` / ``frame``: ``mean_i <k[t, h], qbar[i, h]>`` (the paper's score).
    * ``max``: ``max_i <k[t, h], qbar[i, h]>``.
    * ``softmax``: ``mean_{i, g} softmax_{t in B_j}(scale * <q[i, g], k[t, h]>)`` over the
      query tokens ``i`` and the heads ``g`` of KV head ``h``'s group, the softmax taken over
      the keys of the key's own block ``B_j``.
    """
    n, heads, kv_heads, group = _check_qk(q, k)
    raw = torch.full((kv_heads, n), float("-inf"), dtype=torch.float64, device=q.device)
    if query_len == 0:
        # No query tokens: every score is 0 (all keys tie).
        raw.zero_()
        return raw
    q64 = q[n - query_len :].to(torch.float64).reshape(query_len, kv_heads, group, q.shape[-1])
    k64 = k.to(torch.float64)
    if selection == "softmax":
        for start, end in bounds:
            if end == start:
                continue
            logits = torch.einsum("ihgd,thd->hgit", q64, k64[start:end]) * scale  # [kvh, g, q, L]
            raw[:, start:end] = torch.softmax(logits, dim=-1).mean(dim=(1, 2))
        return raw
    qbar = q64.mean(dim=2)  # [q, kvh, dim]
    dots = torch.einsum("thd,ihd->hti", k64, qbar)  # [kvh, N, q]
    return dots.amax(dim=2) if selection == "max" else dots.mean(dim=2)


def _smooth(raw: torch.Tensor, window: int, bounds) -> torch.Tensor:
    """Centred max-pool of ``window`` inside each block (``-inf`` outside every block)."""
    half = window // 2
    smooth = torch.full_like(raw, float("-inf"))
    for start, end in bounds:
        if end == start:
            continue
        pad = torch.full((raw.shape[0], half), float("-inf"), dtype=raw.dtype, device=raw.device)
        padded = torch.cat([pad, raw[:, start:end], pad], dim=1)
        smooth[:, start:end] = padded.unfold(1, window, 1).amax(dim=-1)
    return smooth


def _block_order(selection, smooth_block, raw_block, start, pj, frame_start, frame_len, recent_fraction):
    """Positions (relative to the block) of every KV head's keys, best first: ``[kv_heads, L]``.

    ``smooth_block`` / ``raw_block`` are ``[kv_heads, L]``. Ties go to the lower position
    (stable descending sorts throughout).
    """
    kv_heads, length = smooth_block.shape
    positions = torch.arange(length, device=smooth_block.device)
    if selection == "frame":
        # Whole frames: a frame (its tokens inside this block) scores its best raw key;
        # frames in descending score, each frame's tokens in position order.
        frame_id = torch.div(positions + start - frame_start, frame_len, rounding_mode="floor")
        frame_id = torch.where(positions + start < frame_start, torch.full_like(frame_id, -1), frame_id)
        ids, inverse = torch.unique(frame_id, return_inverse=True)  # ids ascending = frames in time order
        inverse = inverse.expand(kv_heads, -1)
        best = torch.full((kv_heads, len(ids)), float("-inf"), dtype=raw_block.dtype, device=raw_block.device)
        best = best.scatter_reduce(1, inverse, raw_block, "amax")
        frame_rank = torch.empty_like(inverse[:, : len(ids)])
        frame_rank.scatter_(1, torch.sort(best, dim=1, descending=True, stable=True).indices,
                            positions[: len(ids)].expand(kv_heads, -1))
        return torch.sort(torch.gather(frame_rank, 1, inverse), dim=1, stable=True).indices
    order = torch.sort(smooth_block, dim=1, descending=True, stable=True).indices
    if selection == "recent":
        # The block's last r = floor(recent_fraction * p_j) keys first, then the rest by score.
        r = math.floor(recent_fraction * pj)
        recent = positions[length - r :].expand(kv_heads, -1)
        rest = order[order < length - r].view(kv_heads, length - r)  # the same count in every head
        return torch.cat([recent, rest], dim=1)
    return order


def apbv_passing_selection_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    world_size: int,
    anchor_len: int,
    query_len: int,
    passing_len,
    zigzag: bool = True,
    window: int = 5,
    selection: str = "mean",
    softmax_scale=None,
    frame_start: int = 0,
    frame_len: int = 1,
    recent_fraction: float = 0.25,
) -> List[torch.Tensor]:
    """Passing selection ``P_j`` of every virtual block (docs/design.md §3 steps 1-2).

    ``selection="mean"`` (the paper's rule): for every KV head ``h``,
    ``qbar[i, h]`` is the mean over the GQA group of ``q[i]`` for each query
    token ``i`` in ``Q``; the score of key ``t`` is ``s[t, h] = mean_i <k[t, h],
    qbar[i, h]>`` (float64), smoothed by a max-pool of ``window`` (stride 1,
    centred, ``-inf`` outside the key's own block). In every block ``B_j`` the
    ``p_j = min(passing_len, len(B_j))`` keys with the highest smoothed score
    are selected per KV head. Ties: the lower global position wins. With
    ``query_len == 0`` all scores are 0, so the tie rule picks the first keys
    of each block.

    The other rules pass the same ``p_j`` keys per block and KV head:

    * ``max``: the score is ``max_i`` instead of ``mean_i`` (then smoothed);
    * ``softmax``: the score is the attention the query tokens would give the key
      inside its block, ``mean_{i,g} softmax_t(softmax_scale * <q[i, g], k[t, h]>)``
      (then smoothed);
    * ``recent``: the block's last ``floor(recent_fraction * p_j)`` keys, and the
      rest of ``p_j`` by the smoothed mean score among the others;
    * ``frame``: whole frames (frame ``f`` = tokens ``[frame_start + f *
      frame_len, ...)``; tokens before ``frame_start`` form one frame), frames in
      descending order of their best raw mean score, ties to the earlier frame;
      the last frame taken may be cut (its first tokens).

    Returns a list with one ``torch.long`` tensor ``[kv_heads, p_j]`` per
    virtual block (``2 * world_size`` with zigzag, ``world_size`` without),
    holding GLOBAL token indices sorted ascending per head.
    """
    n, _, kv_heads, _ = _check_qk(q, k)
    world_size = _check_world_size(world_size)
    anchor_len = _check_nonneg_int("anchor_len", anchor_len)
    query_len = _check_nonneg_int("query_len", query_len)
    p = _check_passing_len(passing_len)
    window = _check_window(window)
    selection = _check_selection(selection, frame_len, recent_fraction)
    frame_start = _check_nonneg_int("frame_start", frame_start)
    bounds = apbv_block_bounds_reference(
        n,
        world_size=world_size,
        anchor_len=anchor_len,
        query_len=query_len,
        zigzag=zigzag,
    )
    raw = _raw_scores(q, k, query_len, selection, _scale(softmax_scale, q.shape[-1]), bounds)
    smooth = _smooth(raw, window, bounds)
    selections = []
    for start, end in bounds:
        length = end - start
        pj = length if p == math.inf else min(p, length)
        if pj == 0:
            selections.append(torch.empty(kv_heads, 0, dtype=torch.long, device=q.device))
            continue
        order = _block_order(selection, smooth[:, start:end], raw[:, start:end], start, pj,
                             frame_start, frame_len, recent_fraction)
        selections.append(torch.sort(order[:, :pj] + start, dim=1).values)
    return selections


# --------------------------------------------------------------------------
# mask and attention
# --------------------------------------------------------------------------


def apbv_mask_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    world_size: int,
    anchor_len: int,
    query_len: int,
    passing_len,
    zigzag: bool = True,
    window: int = 5,
    **selection,
) -> torch.Tensor:
    """Explicit APB-V visibility mask ``bool [kv_heads, N, N]``.

    ``mask[h, i, t]`` is ``True`` when row ``i`` attends to key ``t`` for
    KV head ``h``:

    * anchor rows ``i < a``: keys ``t <= i`` (causal inside ``A``);
    * rows ``i`` of block ``B_j``: all of ``A``, the selected keys (for head
      ``h``) of every earlier block ``B_0 .. B_{j-1}``, and keys of ``B_j``
      with ``t <= i``;
    * query rows ``i >= N - q``: every key ``t <= i`` (exact, docs/design.md §3 step 4).

    Selections come from :func:`apbv_passing_selection_reference` (``selection``:
    its rule keywords ``selection, softmax_scale, frame_start, frame_len,
    recent_fraction``).
    """
    n, _, kv_heads, _ = _check_qk(q, k)
    selections = apbv_passing_selection_reference(
        q,
        k,
        world_size=world_size,
        anchor_len=anchor_len,
        query_len=query_len,
        passing_len=passing_len,
        zigzag=zigzag,
        window=window,
        **selection,
    )
    bounds = apbv_block_bounds_reference(
        n,
        world_size=world_size,
        anchor_len=anchor_len,
        query_len=query_len,
        zigzag=zigzag,
    )
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    mask = torch.zeros(kv_heads, n, n, dtype=torch.bool, device=q.device)
    # anchor rows: causal inside A
    mask[:, :anchor_len, :anchor_len] = causal[:anchor_len, :anchor_len]
    # block rows: A, the keys passed by every earlier block (per head), causal inside the own block
    passed = torch.zeros(kv_heads, n, dtype=torch.bool, device=q.device)
    for j, (start, end) in enumerate(bounds):
        if j > 0:
            passed.scatter_(1, selections[j - 1], True)
        mask[:, start:end, :anchor_len] = True
        mask[:, start:end] |= passed[:, None, :]
        mask[:, start:end, start:end] = causal[: end - start, : end - start]
    # query rows: dense causal
    mask[:, n - query_len :] = causal[n - query_len :]
    return mask


def apbv_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    world_size: int,
    anchor_len: int,
    query_len: int,
    passing_len,
    zigzag: bool = True,
    window: int = 5,
    softmax_scale=None,
    **selection,
) -> torch.Tensor:
    """APB-V attention of one layer (prefill), computed in a single process.

    Shapes as in :func:`dense_attention_reference` (RoPE already applied).
    The output is causal attention under :func:`apbv_mask_reference`, each
    query head using its KV head's mask, softmax in float64, returned in
    ``q.dtype``.

    ``passing_len`` is the per-block, per-KV-head passing budget ``p``:
    ``float('inf')`` (or any int >= the longest block) is exact mode and
    equals dense causal attention; ``0`` is Star Attention. Raises
    ``ValueError`` on invalid arguments (``anchor_len + query_len > N``,
    ``world_size < 1``, negative budgets, ``window`` not a positive odd int,
    ``heads`` not divisible by ``kv_heads``). ``selection`` takes the rule
    keywords of :func:`apbv_passing_selection_reference` (default: the paper's rule).
    """
    _check_qk(q, k)
    _check_v(v, k)
    mask = apbv_mask_reference(
        q,
        k,
        world_size=world_size,
        anchor_len=anchor_len,
        query_len=query_len,
        passing_len=passing_len,
        zigzag=zigzag,
        window=window,
        softmax_scale=softmax_scale,
        **selection,
    )
    return masked_attention_reference(q, k, v, mask, softmax_scale=softmax_scale)
