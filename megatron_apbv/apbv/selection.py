"""Score and select: which keys of a block are passed to later blocks (docs/design.md §3 steps 1-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_apbv.apbv.kernels_dispatch import kernel_for


def passing_scores(q_query: torch.Tensor, k_block: torch.Tensor, *, window: int) -> torch.Tensor:
    """Query-aware score of every key of one block, smoothed inside the block.

    ``q_query`` ``[q, b, hq, d]`` are the query tokens' queries, ``k_block``
    ``[L, b, hkv, d]`` the block's keys. The query is averaged over the heads of
    each GQA group and over the query tokens (the mean of dot products equals the
    dot product with the mean), dotted with each key in fp32, then max-pooled with
    ``window`` (stride 1, ``-inf`` past the block's edges). Returns ``[b, hkv, L]``.
    """
    kernel = kernel_for("passing_scores", k_block)
    if kernel is not None:
        return kernel(q_query, k_block, window=window)
    _, b, hq, d = q_query.shape
    hkv = k_block.shape[2]
    qbar = q_query.float().mean(dim=0).view(b, hkv, hq // hkv, d).mean(dim=2)
    scores = torch.einsum("tbhd,bhd->bht", k_block.float(), qbar)
    if k_block.shape[0] == 0 or window == 1:
        return scores
    # max_pool1d pads with -inf, so the window never reaches into a neighbouring block.
    pooled = F.max_pool1d(scores.reshape(b * hkv, 1, -1), window, stride=1, padding=window // 2)
    return pooled.view(b, hkv, -1)


def select_passing(
    k_block: torch.Tensor, v_block: torch.Tensor, scores: torch.Tensor, passing_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the top-``min(p, L)`` keys and values of each KV head by score.

    Ties (frequent after max-pooling) go to the earlier token: a stable descending
    sort makes the choice deterministic and identical in the reference oracle.
    Returns ``[min(p, L), b, hkv, d]`` for K and V.
    """
    kernel = kernel_for("select_passing", k_block)
    if kernel is not None:
        return kernel(k_block, v_block, scores, passing_len)
    count = min(passing_len, k_block.shape[0])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    index = order.permute(2, 0, 1).unsqueeze(-1).expand(-1, -1, -1, k_block.shape[-1])
    return torch.gather(k_block, 0, index), torch.gather(v_block, 0, index)
