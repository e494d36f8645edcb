"""Time of one attention layer per method: the cost entries ``megatron_apbv.methods`` names.

Every cost function takes ``(shape, cluster, n, seq, passing_len, method)``; ``seq``
is the APB-V layout (APB-V family only) and ``passing_len`` its budget. The
``*_tokens`` functions are the registry's ``local_tokens`` entries: the tokens each
rank holds (``(n, world, seq)``), which size the linear layers and activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.costmodel.pairs import apbv_pairs, causal_pairs, ring_pair_matrix
from megatron_apbv.costmodel.shapes import Cluster, ModelShape
from megatron_apbv.methods import get_method

LSE_BYTES = 4  # the log-sum-exp travels in fp32


@dataclass
class AttentionCost:
    seconds: float  # attention phase of one layer, communication included as the method overlaps it
    compute_s: float  # attention compute on the slowest rank
    comm_s: float  # communication time if nothing overlapped
    flops: float  # attention FLOPs of the busiest rank
    comm_bytes: float  # bytes each rank receives
    extra_bytes: float = 0.0  # method buffers for the memory estimate


def whole_prompt_tokens(n: int, world: int, seq=None) -> int:
    """Dense: one process holds the whole prompt."""
    return n


def ring_local_tokens(n: int, world: int, seq=None) -> int:
    """Zigzag ring: the largest pair of chunks ``r`` and ``2W - 1 - r``."""
    s = SequenceLayout(n, 0, 0, world, zigzag=True)
    return max(len(s.block_spans[r]) + len(s.block_spans[2 * world - 1 - r]) for r in range(world))


def head_split_tokens(n: int, world: int, seq=None) -> int:
    """Ulysses: an even split of the sequence (heads are split only inside attention)."""
    return math.ceil(n / world)


def apb_local_tokens(n: int, world: int, seq: SequenceLayout) -> int:
    """APB-V family: the largest rank's ``[A | blocks | Q]`` of ``seq``."""
    return max(seq.rank(r).local_len for r in range(world))


def dense_attention_cost(shape: ModelShape, cl: Cluster, n: int, seq=None, passing_len: int = 0,
                         method: str = "dense") -> AttentionCost:
    """Causal attention of all ``n`` tokens on one GPU."""
    flops = shape.attention_flops(causal_pairs(n))
    return AttentionCost(flops / cl.method_rate("dense"), flops / cl.method_rate("dense"),
                         0.0, flops, 0.0)


def ring_attention_cost(shape: ModelShape, cl: Cluster, n: int, seq=None, passing_len: int = 0,
                        method: str = "ring") -> AttentionCost:
    """Zigzag ring attention: ``W`` steps, each the larger of its compute and the next chunk's transfer."""
    w = cl.gpus
    if w == 1:
        return dense_attention_cost(shape, cl, n)
    rate = cl.method_rate("ring") * cl.software["ring_efficiency"]
    pairs = ring_pair_matrix(n, w)
    local = ring_local_tokens(n, w)
    merge = cl.software["merge_bytes_per_element"] * local * shape.heads * shape.head_dim * shape.batch / cl.mem_bw
    chunk_bytes = shape.kv_bytes(local)
    step_comm = cl.p2p_s(chunk_bytes)
    total = compute = 0.0
    flops = 0.0
    rows = np.arange(w)
    for t in range(w):
        step_pairs = int(pairs[rows, (rows - t) % w].max())
        step = shape.attention_flops(step_pairs) / rate + (merge if t else 0.0)
        compute += step
        flops += shape.attention_flops(step_pairs)
        total += max(step, step_comm if t < w - 1 else 0.0)
    return AttentionCost(total, compute, (w - 1) * step_comm, flops, (w - 1) * chunk_bytes, 2 * chunk_bytes)


def ulysses_attention_cost(shape: ModelShape, cl: Cluster, n: int, seq=None, passing_len: int = 0,
                           method: str = "ulysses") -> AttentionCost | str:
    """Four all-to-alls around full-length causal attention on ``heads / W`` heads (or why it cannot run)."""
    w = cl.gpus
    if shape.heads % w:
        return f"Ulysses splits the {shape.heads} heads over the GPUs: {w} does not divide them"
    # As megatron_apbv/baselines/ulysses.py: repeat each KV head f times (f divides the GQA group)
    # until the KV heads divide by W.
    group = shape.heads // shape.kv_heads
    repeat = next((f for f in range(1, group + 1) if group % f == 0 and shape.kv_heads * f % w == 0), None)
    if repeat is None:
        return f"Ulysses: no KV-head repetition makes {shape.kv_heads} KV heads divide by {w}"
    heads = shape.heads // w
    local = math.ceil(n / w)
    kv_heads = shape.kv_heads * repeat
    b, d, e = shape.batch, shape.head_dim, shape.dtype_bytes
    q_bytes = local * shape.heads * d * e * b
    kv_bytes = local * kv_heads * d * e * b
    comm = 2 * cl.alltoall_s(q_bytes) + 2 * cl.alltoall_s(kv_bytes)  # q, out; k, v
    flops = shape.attention_flops(causal_pairs(n), heads=heads)
    compute = flops / cl.method_rate("ulysses")
    recv = (w - 1) / w * (2 * q_bytes + 2 * kv_bytes)
    extra = n * (heads * 2 + 2 * math.ceil(kv_heads / w)) * d * e * b
    return AttentionCost(compute + comm, compute, comm, flops, recv, extra)


def apb_attention_cost(shape: ModelShape, cl: Cluster, n: int, seq: SequenceLayout, passing_len: int,
                       method: str) -> AttentionCost:
    """APB-V / APB-like / Star attention of one layer, simulated as a compute stream per rank and one link.

    ``seq.zigzag`` and the variant's overlap (the registry's ``setting("overlap")``) decide the schedule."""
    overlap = get_method(method).setting("overlap")
    w = seq.world_size
    rate = cl.method_rate(method)
    pairs = apbv_pairs(seq, passing_len)
    passed = seq.passed_per_block(passing_len)
    n_ex = 2 if seq.zigzag else 1
    row_bytes = 2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes * shape.batch  # K and V of one key
    ex_bytes = [w * max(passed[seq.blocks_of(r)[e]] for r in range(w)) * row_bytes for e in range(n_ex)]
    ex_time = [cl.allgather_s(x) for x in ex_bytes]
    q_bytes = w * seq.query_len * shape.heads * (shape.head_dim * shape.dtype_bytes + LSE_BYTES) * shape.batch
    q_time = cl.allgather_s(q_bytes)
    sel_fixed = cl.software["select_overhead_ms"] * 1e-3

    def flop_time(p: int) -> float:
        return shape.attention_flops(p) / rate

    def select_time(r: int, e: int) -> float:
        n = len(seq.block_spans[seq.blocks_of(r)[e]])
        if passing_len <= 0 or n == 0:
            return 0.0
        return sel_fixed + n * row_bytes / 2 / cl.mem_bw  # read K once; the selection itself is small

    clock = [0.0] * w
    link = 0.0
    ex_done = [0.0] * n_ex
    for e in range(n_ex):  # select, then issue the exchange of this block
        issued = [clock[r] + select_time(r, e) for r in range(w)]
        start = max(max(issued), link if overlap else 0.0)
        ex_done[e] = link = start + ex_time[e]
        clock = issued if overlap else [ex_done[e]] * w
    issued = [clock[r] + flop_time(pairs[r].query) for r in range(w)]  # query partial, then its merge
    q_done = max(max(issued), link if overlap else 0.0) + q_time
    clock = issued if overlap else [q_done] * w
    for r in range(w):
        blocks = seq.blocks_of(r)
        needs_first = 0 if blocks[0] > 0 else None
        if needs_first is not None:
            clock[r] = max(clock[r], ex_done[0])
        clock[r] += flop_time(pairs[r].anchor + pairs[r].first)
        if n_ex == 2:
            wait = max(ex_done[0], ex_done[1] if blocks[1] > w else 0.0)
            clock[r] = max(clock[r], wait) + flop_time(pairs[r].second)
        clock[r] = max(clock[r], q_done)
    compute = max(sum(select_time(r, e) for e in range(n_ex)) + flop_time(pairs[r].total) for r in range(w))
    flops = max(shape.attention_flops(p.total) for p in pairs)
    recv = (w - 1) / w * (sum(ex_bytes) + q_bytes) if w > 1 else 0.0
    return AttentionCost(max(clock), compute, sum(ex_time) + q_time, flops, recv, sum(ex_bytes) + q_bytes)
