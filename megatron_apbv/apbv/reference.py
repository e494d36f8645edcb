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
    out = torch.empty(n, heads, v.shape[-1], dtype=torch.float64)
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


def _smoothed_scores(
    q: torch.Tensor, k: torch.Tensor, query_len: int, window: int, bounds
) -> torch.Tensor:
    """Smoothed selection scores ``[kv_heads, N]`` (float64).

    Positions outside every context block are left at ``-inf``.
    """
    n, heads, kv_heads, group = _check_qk(q, k)
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64)
    # qbar[i, h] = mean of q[i, g] over the heads g of KV head h's group.
    qq = q64[n - query_len :]  # [q, heads, dim]
    qbar = qq.reshape(query_len, kv_heads, group, q.shape[-1]).mean(dim=2)  # [q, kvh, dim]
    raw = torch.full((kv_heads, n), float("-inf"), dtype=torch.float64)
    for h in range(kv_heads):
        if query_len > 0:
            # s[t, h] = mean_i <k[t, h], qbar[i, h]>
            raw[h] = (k64[:, h, :] @ qbar[:, h, :].T).mean(dim=1)
        else:
            # No query tokens: the empty mean is defined as 0 (all keys tie).
            raw[h] = 0.0
    half = window // 2
    smooth = torch.full((kv_heads, n), float("-inf"), dtype=torch.float64)
    for start, end in bounds:
        for t in range(start, end):
            lo = max(start, t - half)
            hi = min(end, t + half + 1)
            smooth[:, t] = raw[:, lo:hi].max(dim=1).values
    return smooth


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
) -> List[torch.Tensor]:
    """Passing selection ``P_j`` of every virtual block (docs/design.md §3 steps 1-2).

    For every KV head ``h``: ``qbar[i, h]`` is the mean over the GQA group of
    ``q[i]`` for each query token ``i`` in ``Q``; the score of key ``t`` is
    ``s[t, h] = mean_i <k[t, h], qbar[i, h]>`` (float64), smoothed by a
    max-pool of ``window`` (stride 1, centred, ``-inf`` outside the key's own
    block). In every block ``B_j`` the ``min(passing_len, len(B_j))`` keys
    with the highest smoothed score are selected per KV head. Ties: the lower
    global position wins. With ``query_len == 0`` all scores are 0, so the
    tie rule picks the first keys of each block.

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
    bounds = apbv_block_bounds_reference(
        n,
        world_size=world_size,
        anchor_len=anchor_len,
        query_len=query_len,
        zigzag=zigzag,
    )
    smooth = _smoothed_scores(q, k, query_len, window, bounds)
    selections = []
    for start, end in bounds:
        length = end - start
        pj = length if p == math.inf else min(p, length)
        sel = torch.empty(kv_heads, pj, dtype=torch.long)
        for h in range(kv_heads):
            # Stable descending sort: equal scores keep ascending position order,
            # so the lower position wins a tie.
            order = torch.sort(smooth[h, start:end], descending=True, stable=True).indices
            sel[h] = torch.sort(order[:pj] + start).values
        selections.append(sel)
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
) -> torch.Tensor:
    """Explicit APB-V visibility mask ``bool [kv_heads, N, N]``.

    ``mask[h, i, t]`` is ``True`` when row ``i`` attends to key ``t`` for
    KV head ``h``:

    * anchor rows ``i < a``: keys ``t <= i`` (causal inside ``A``);
    * rows ``i`` of block ``B_j``: all of ``A``, the selected keys (for head
      ``h``) of every earlier block ``B_0 .. B_{j-1}``, and keys of ``B_j``
      with ``t <= i``;
    * query rows ``i >= N - q``: every key ``t <= i`` (exact, docs/design.md §3 step 4).

    Selections come from :func:`apbv_passing_selection_reference`.
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
    )
    bounds = apbv_block_bounds_reference(
        n,
        world_size=world_size,
        anchor_len=anchor_len,
        query_len=query_len,
        zigzag=zigzag,
    )
    mask = torch.zeros(kv_heads, n, n, dtype=torch.bool)
    # anchor rows: causal inside A
    for i in range(anchor_len):
        mask[:, i, : i + 1] = True
    # block rows
    for j, (start, end) in enumerate(bounds):
        for i in range(start, end):
            mask[:, i, :anchor_len] = True
            for jj in range(j):
                for h in range(kv_heads):
                    mask[h, i, selections[jj][h]] = True
            mask[:, i, start : i + 1] = True
    # query rows: dense causal
    for i in range(n - query_len, n):
        mask[:, i, : i + 1] = True
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
    ``heads`` not divisible by ``kv_heads``).
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
    )
    return masked_attention_reference(q, k, v, mask, softmax_scale=softmax_scale)
