"""Score and select: which keys of a block are passed to later blocks (docs/design.md §3 steps 1-2).

The paper's rule (``mean``) scores each key by its dot product with the mean query
and has a fused kernel. The other rules (issue 19) pass the same number of keys per
block and KV head, so the exchange and the attention cost are unchanged; each is
written as a score whose stable top-``p`` is the rule's selection, so one
``select_passing`` serves all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_apbv.apbv.kernels_dispatch import kernel_for

SELECTION_RULES = ("mean", "softmax", "max", "recent", "frame")


@dataclass(frozen=True)
class SelectionRule:
    """The passing-selection rule of a layer and the geometry it needs.

    ``name``: ``mean`` (paper: mean over query tokens of the dot product with the
    group-mean query), ``max`` (max over query tokens instead), ``softmax`` (the
    attention the query tokens would give the key inside its block, averaged over
    query tokens and the GQA group), ``recent`` (the block's last
    ``floor(recent_fraction * p)`` keys, the rest by ``mean``), ``frame`` (whole
    frames of ``frame_len`` tokens starting at global position ``frame_start``,
    ranked by their best raw ``mean`` key score). All but ``frame`` and ``recent``'s
    reserved keys are max-pool smoothed with the layer's window.
    """

    name: str = "mean"
    frame_start: int = 0
    frame_len: int = 1
    recent_fraction: float = 0.25

    def __post_init__(self):
        if self.name not in SELECTION_RULES:
            raise ValueError(f"selection rule {self.name!r}: choose one of {SELECTION_RULES}")

    @classmethod
    def from_config(cls, cfg) -> "SelectionRule":
        """``apbv.selection`` with its frame grid: ``input.system_tokens``, then frames of ``input.tokens_per_frame``."""
        from megatron_apbv.runtime.config import ConfigError

        if cfg.apbv.selection == "frame" and cfg.input.kind == "video":
            raise ConfigError("apbv.selection=frame needs input.kind=synthetic or needle (a fixed frame grid); "
                              "choose another apbv.selection for input.kind=video")
        return cls(cfg.apbv.selection, frame_start=cfg.input.system_tokens, frame_len=cfg.input.tokens_per_frame,
                   recent_fraction=cfg.apbv.recent_fraction)


PAPER_RULE = SelectionRule()  # the default: the paper's mean query score


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
    return _smooth(scores, window)


def _smooth(scores: torch.Tensor, window: int) -> torch.Tensor:
    if scores.shape[-1] == 0 or window == 1:
        return scores
    b, hkv, _ = scores.shape
    # max_pool1d pads with -inf, so the window never reaches into a neighbouring block.
    pooled = F.max_pool1d(scores.reshape(b * hkv, 1, -1), window, stride=1, padding=window // 2)
    return pooled.view(b, hkv, -1)


def rule_scores(
    q_query: torch.Tensor,
    k_block: torch.Tensor,
    rule: SelectionRule,
    *,
    window: int,
    passing_len: int,
    block_start: int,
    softmax_scale: float,
) -> torch.Tensor:
    """Scores ``[b, hkv, L]`` of one block whose stable top-``passing_len`` is ``rule``'s selection.

    ``block_start`` is the block's first global position (``frame``'s frame grid and
    nothing else depends on it).
    """
    if rule.name == "mean":
        return passing_scores(q_query, k_block, window=window)
    length = k_block.shape[0]
    _, b, hq, d = q_query.shape
    hkv = k_block.shape[2]
    if rule.name in ("max", "softmax"):
        q = q_query.float().view(-1, b, hkv, hq // hkv, d)
        if rule.name == "max":
            dots = torch.einsum("tbhd,ibhd->bhit", k_block.float(), q.mean(dim=3))
            return _smooth(dots.amax(dim=2), window)
        logits = torch.einsum("ibhgd,tbhd->bhgit", q, k_block.float()) * softmax_scale
        return _smooth(torch.softmax(logits, dim=-1).mean(dim=(2, 3)), window)
    if rule.name == "recent":
        scores = passing_scores(q_query, k_block, window=window).clone()
        reserved = math.floor(rule.recent_fraction * min(passing_len, length))
        scores[..., length - reserved :] = math.inf  # ties among them: all are taken
        return scores
    # frame: every token scores minus its frame's rank, so whole frames go first, best first.
    raw = passing_scores(q_query, k_block, window=1)
    pos = torch.arange(block_start, block_start + length, device=k_block.device)
    frame = torch.div(pos - rule.frame_start, rule.frame_len, rounding_mode="floor").clamp(min=-1)
    frame = frame - frame[0] if length else frame
    frames = int(frame[-1]) + 1 if length else 0
    best = raw.new_full((b, hkv, frames), -math.inf).scatter_reduce(
        2, frame.expand(b, hkv, -1), raw, "amax")
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(2, order, torch.arange(frames, device=order.device).expand_as(order))
    return -torch.gather(rank, 2, frame.expand(b, hkv, -1)).float()


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
