"""Video decode on W ranks: each rank decodes only the frames of its own temporal groups.

``apbv infer``/``apbv generate`` build each rank's prompt with its share of the
frames (``Engine.read_prompt`` with ``frame_share``): rank ``r`` decodes and
resizes the frames of the groups ``split_groups(G, W)[r]``. Decoding costs about
the same per sampled frame, so the W-rank stage takes the measured one-rank
time times the largest rank's share of the groups.
"""

from __future__ import annotations


def largest_group_share(num_groups: int, world_size: int) -> float:
    """The largest rank's fraction of ``num_groups`` temporal groups (earlier ranks take one more)."""
    if num_groups <= 0:
        return 0.0
    return -(-num_groups // world_size) / num_groups


def video_decode_seconds(seconds_one_rank: float, num_groups: int, world_size: int) -> float:
    """Predicted video-decode seconds on ``world_size`` ranks from the one-rank measurement."""
    return seconds_one_rank * largest_group_share(num_groups, world_size)
