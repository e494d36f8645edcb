"""Prefill time model: dense, ring (zigzag), Ulysses, Star, APB-like and APB-V.

What it counts, per rank and per layer:

* attention FLOPs ``4 * d * heads * visible_pairs`` (QK^T and PV, two FLOPs per
  multiply-add), with the visible (query, key) pairs of each rank counted from
  the real layouts: ``megatron_apbv.apbv.layout.SequenceLayout`` for APB-V, APB-like
  and Star (anchor rows on every rank, the rank's blocks over the passing keys,
  its share of the exact query attention), the same zigzag split of the whole
  prompt for ring attention, full-length causal attention on a subset of the
  heads for Ulysses;
* linear FLOPs ``2 * params_per_token`` (QKV, output projection, SwiGLU MLP) on
  every LOCAL token: APB-V computes the anchor and the query on every rank,
  which is its redundancy cost;
* non-matmul work (norms, RoPE, SwiGLU, residual adds, casts) as memory
  traffic, scaled by ``software.elementwise_factor``;
* communication: APB-V all-gathers its passing blocks (one exchange per block
  half, ``2 * W * p * hkv * d * bytes`` each) and the query ``(out, lse)``; ring
  attention sends a K/V chunk per step (``W - 1`` steps); Ulysses runs four
  all-to-alls (q, k, v, out).

Overlap rules: ring steps cost ``max(step compute, next chunk's transfer)``; APB-V
(overlap on) is simulated as two streams, a compute stream per rank and one
link, with each collective starting when the last rank issues it and each
block waiting for the exchange it needs; APB-like (overlap off) and Ulysses
add their communication to the compute.

Rates are achieved rates from ``configs/costmodel.yaml``; :func:`calibrate` fits
the free ones to the measured points (one parameter per group of measurements,
least squares in log time). It is a time model only: it says nothing about the
accuracy of an approximate method.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import yaml

from megatron_apbv.apbv.layout import SequenceLayout

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROFILES = ROOT / "configs" / "costmodel.yaml"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("dense", "ring", "ulysses", "star", "apb_like", "apbv")
LSE_BYTES = 4  # the log-sum-exp travels in fp32


# ----------------------------------------------------------------------------------
# model shape
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a decoder depends on. ``attention_only`` drops everything but attention."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2
    batch: int = 1
    attention_only: bool = False

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        m = cfg.model
        return cls(
            layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads, kv_heads=m.num_query_groups,
            head_dim=m.head_dim, ffn=m.ffn_hidden_size, vocab=m.vocab_size, tied_embeddings=m.tie_embeddings,
            dtype_bytes=DTYPE_BYTES[cfg.dtype], batch=cfg.input.batch_size,
        )

    @classmethod
    def attention(cls, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> "ModelShape":
        """One attention call of one layer (the kernel benchmarks and the H200 points)."""
        return cls(1, 0, heads, kv_heads, head_dim, 0, 0, dtype_bytes=dtype_bytes, attention_only=True)

    @property
    def layer_params(self) -> int:
        """Weights of the linear layers of one decoder layer: QKV, output projection, SwiGLU MLP."""
        if self.attention_only:
            return 0
        h, d = self.hidden, self.head_dim
        return h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h + 3 * h * self.ffn

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (self.layer_params + 2 * self.hidden) + self.hidden + embeddings

    def linear_flops(self, tokens: int) -> float:
        """One layer's matmul FLOPs on ``tokens`` local tokens: ``2 * params`` per token."""
        return 2.0 * self.layer_params * tokens * self.batch

    def attention_flops(self, pairs: int, heads: Optional[int] = None) -> float:
        """``4 * d * heads * pairs``: QK^T and PV over the visible (query, key) pairs."""
        return 4.0 * self.head_dim * (self.heads if heads is None else heads) * pairs * self.batch

    @property
    def elementwise_elems(self) -> int:
        """Activation elements per token per layer touched by non-matmul work (one pass).

        Two norms and two residual adds (4H), RoPE on q and k, the attention
        output, SwiGLU (gate, up, out).
        """
        if self.attention_only:
            return 0
        d = self.head_dim
        return 4 * self.hidden + 2 * (self.heads + self.kv_heads) * d + self.heads * d + 3 * self.ffn

    def kv_bytes(self, tokens: int, heads: Optional[int] = None) -> float:
        """K and V of ``tokens`` tokens."""
        return 2.0 * tokens * (self.kv_heads if heads is None else heads) * self.head_dim * self.dtype_bytes * self.batch

    def activation_bytes(self, tokens: int) -> float:
        """Peak live activations of one layer on ``tokens`` tokens (residual, QKV, attention out, MLP)."""
        d = self.head_dim
        elems = 2 * self.hidden + (2 * self.heads + 2 * self.kv_heads) * d + 2 * self.ffn
        return float(elems) * tokens * self.dtype_bytes * self.batch


# ----------------------------------------------------------------------------------
# hardware
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """``gpus`` GPUs of one kind, ``gpus_per_node`` to a node, joined by one interconnect profile."""

    gpu_name: str
    gpu: dict
    link_name: str
    link: dict
    software: dict
    gpus: int
    gpus_per_node: int = 8

    @property
    def multi_node(self) -> bool:
        return self.gpus > self.gpus_per_node and not self.link.get("single_domain", False)

    def _link(self) -> tuple[float, float, float]:
        """(bytes/s, base latency s, per-hop latency s) of the slowest link the group uses."""
        level = "inter" if self.multi_node else "intra"
        lat = self.link[f"{level}_latency_us"]
        return self.link[f"{level}_gbs"] * 1e9, lat["base"] * 1e-6, lat["hop"] * 1e-6

    # rates ------------------------------------------------------------------------------
    def attention_rate(self, kernel: str) -> float:
        return self.gpu["attention_tflops"][kernel] * 1e12

    @property
    def matmul_rate(self) -> float:
        return self.gpu["matmul_tflops"] * 1e12

    @property
    def mem_bw(self) -> float:
        return self.gpu["mem_bw_gbs"] * 1e9

    @property
    def memory_bytes(self) -> float:
        return self.gpu["memory_gb"] * 1e9

    def kernel(self, method: str) -> str:
        return self.software["kernel"][method]

    # collectives --------------------------------------------------------------------------
    def allgather_s(self, total_bytes: float) -> float:
        """Ring all-gather whose result holds ``total_bytes``: ``(W-1)/W * S / busbw`` plus latency."""
        w = self.gpus
        if w == 1 or total_bytes <= 0:
            return 0.0
        bw, base, hop = self._link()
        return (w - 1) / w * total_bytes / bw + base + hop * (w - 1)

    def alltoall_s(self, bytes_per_rank: float) -> float:
        """All-to-all where each rank holds ``bytes_per_rank`` and keeps ``1/W`` of it.

        Across nodes, the share bound for other nodes goes over the slow link and
        the share for the own node over NVLink, at the same time.
        """
        w = self.gpus
        if w == 1 or bytes_per_rank <= 0:
            return 0.0
        bw, base, hop = self._link()
        if not self.multi_node:
            return (w - 1) / w * bytes_per_rank / bw + base + hop * (w - 1)
        g = self.gpus_per_node
        intra = (g - 1) / w * bytes_per_rank / (self.link["intra_gbs"] * 1e9)
        inter = (w - g) / w * bytes_per_rank / bw
        return max(intra, inter) + base + hop * (w - 1)

    def p2p_s(self, nbytes: float) -> float:
        """One ring step: every rank sends ``nbytes`` to its successor (full duplex)."""
        if self.gpus == 1 or nbytes <= 0:
            return 0.0
        bw, base, _ = self._link()
        return nbytes / bw + base


# ----------------------------------------------------------------------------------
# visible pairs, from the layouts
# ----------------------------------------------------------------------------------


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def ring_pair_matrix(prompt_len: int, world_size: int) -> np.ndarray:
    """``R[r, s]``: causal (query, key) pairs between the tokens of rank ``r`` and of rank ``s``.

    Ring attention with zigzag cuts the whole prompt into ``2W`` chunks
    (``tensor_split`` rule) and rank ``r`` holds chunks ``r`` and ``2W-1-r``; at
    step ``t`` rank ``r`` attends to the K/V of rank ``(r - t) mod W``.
    """
    seq = SequenceLayout(prompt_len, 0, 0, world_size, zigzag=True)
    lens = np.array([len(s) for s in seq.block_spans], dtype=np.int64)
    chunk = np.tril(np.outer(lens, lens), -1) + np.diag(lens * (lens + 1) // 2)  # [2W, 2W]
    owner = np.array([seq.owner(j) for j in range(seq.num_blocks)])
    onehot = np.zeros((seq.num_blocks, world_size), dtype=np.int64)
    onehot[np.arange(seq.num_blocks), owner] = 1
    return onehot.T @ chunk @ onehot


@dataclass(frozen=True)
class RankPairs:
    """Visible pairs of one APB-V rank, per part of its work (per KV head, one sequence)."""

    anchor: int  # anchor rows, causal inside A (every rank: redundant)
    first: int  # rows of the first block: passing keys + A + the block causally
    second: int  # rows of the second block (zigzag)
    query: int  # query rows over this rank's share of the keys (exact attention, merged)

    @property
    def total(self) -> int:
        return self.anchor + self.first + self.second + self.query


def apbv_pairs(seq: SequenceLayout, passing_len: int) -> list[RankPairs]:
    """Visible pairs of every rank of the APB-V layout ``seq`` with budget ``passing_len``."""
    a, q = seq.anchor_len, seq.query_len
    passed = seq.passing_lens(passing_len)
    before = np.concatenate([[0], np.cumsum(passed)]).astype(np.int64).tolist()  # keys passed by B_0..B_{j-1}
    out = []
    for r in range(seq.world_size):
        layout = seq.rank(r)
        parts = []
        for j, span in layout.blocks:
            n = len(span)
            parts.append(n * (before[j] + a) + causal_pairs(n))
        parts += [0] * (2 - len(parts))
        share = layout.anchor_share
        query = q * (share.stop - share.start + sum(layout.block_lens))
        query += causal_pairs(q) if layout.holds_query_keys else 0
        out.append(RankPairs(causal_pairs(a), parts[0], parts[1], query))
    return out


# ----------------------------------------------------------------------------------
# predictions
# ----------------------------------------------------------------------------------


@dataclass
class AttentionCost:
    seconds: float  # attention phase of one layer, communication included as the method overlaps it
    compute_s: float  # attention compute on the slowest rank
    comm_s: float  # communication time if nothing overlapped
    flops: float  # attention FLOPs of the busiest rank
    comm_bytes: float  # bytes each rank receives
    extra_bytes: float = 0.0  # method buffers for the memory estimate


@dataclass
class Prediction:
    method: str
    feasible: bool
    reason: str = ""
    seconds: Optional[float] = None  # end-to-end prefill
    layer_ms: Optional[float] = None  # mean per layer
    attention_ms: Optional[float] = None  # per layer, communication as overlapped
    attention_compute_ms: Optional[float] = None
    comm_ms: Optional[float] = None  # per layer, total
    exposed_comm_ms: Optional[float] = None  # per layer, not hidden behind compute
    linear_ms: Optional[float] = None
    elementwise_ms: Optional[float] = None
    local_tokens: Optional[int] = None
    attention_tflop_per_rank: Optional[float] = None  # whole prefill
    linear_tflop_per_rank: Optional[float] = None
    comm_gb_per_rank: Optional[float] = None
    memory_gb: Optional[float] = None
    fits_memory: Optional[bool] = None
    budgets: dict = field(default_factory=dict)

    def as_dict(self, digits: int = 6) -> dict:
        out = {}
        for k, v in asdict(self).items():
            out[k] = round(v, digits) if isinstance(v, float) else v
        return out


def _dense_attention(shape: ModelShape, cl: Cluster, n: int) -> AttentionCost:
    flops = shape.attention_flops(causal_pairs(n))
    return AttentionCost(flops / cl.attention_rate(cl.kernel("dense")), flops / cl.attention_rate(cl.kernel("dense")),
                         0.0, flops, 0.0)


def _ring_attention(shape: ModelShape, cl: Cluster, n: int) -> AttentionCost:
    w = cl.gpus
    if w == 1:
        return _dense_attention(shape, cl, n)
    rate = cl.attention_rate(cl.kernel("ring")) * cl.software["ring_efficiency"]
    pairs = ring_pair_matrix(n, w)
    seq = SequenceLayout(n, 0, 0, w, zigzag=True)
    local = max(len(seq.block_spans[r]) + len(seq.block_spans[2 * w - 1 - r]) for r in range(w))
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


def _ulysses_attention(shape: ModelShape, cl: Cluster, n: int) -> AttentionCost | str:
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
    compute = flops / cl.attention_rate(cl.kernel("ulysses"))
    recv = (w - 1) / w * (2 * q_bytes + 2 * kv_bytes)
    extra = n * (heads * 2 + 2 * math.ceil(kv_heads / w)) * d * e * b
    return AttentionCost(compute + comm, compute, comm, flops, recv, extra)


def _apb_attention(shape: ModelShape, cl: Cluster, seq: SequenceLayout, passing_len: int, *, overlap: bool,
                   method: str) -> AttentionCost:
    """APB-V / APB-like / Star attention of one layer, simulated as a compute stream per rank and one link."""
    w = seq.world_size
    rate = cl.attention_rate(cl.kernel(method))
    pairs = apbv_pairs(seq, passing_len)
    passed = seq.passing_lens(passing_len)
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


def predict(
    method: str,
    shape: ModelShape,
    cluster: Cluster,
    prompt_len: int,
    *,
    anchor_len: int = 0,
    query_len: int = 0,
    passing: int | Sequence[int] = 0,
) -> Prediction:
    """Predicted prefill of ``prompt_len`` tokens by ``method`` on ``cluster``.

    ``passing`` is one budget or one per layer (APB-V, APB-like); Star ignores it
    (p = 0). ``dense`` always runs on one GPU of the cluster's kind.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    w = 1 if method == "dense" else cluster.gpus
    cl = Cluster(cluster.gpu_name, cluster.gpu, cluster.link_name, cluster.link, cluster.software, w,
                 cluster.gpus_per_node)
    per_layer = [passing] * shape.layers if isinstance(passing, int) else list(passing)
    if len(per_layer) != shape.layers:
        raise ValueError(f"{len(per_layer)} passing budgets for {shape.layers} layers")
    budgets: dict = {}
    seq = None
    if method in ("star", "apb_like", "apbv"):
        seq = SequenceLayout(prompt_len, anchor_len, query_len, w, zigzag=method != "apb_like")
        if method == "star":
            per_layer = [0] * shape.layers
        local = max(seq.rank(r).local_len for r in range(w))
        budgets = {"anchor": anchor_len, "passing": per_layer[0] if len(set(per_layer)) == 1 else per_layer,
                   "query": query_len}
    elif method == "ring":
        s = SequenceLayout(prompt_len, 0, 0, w, zigzag=True)
        local = max(len(s.block_spans[r]) + len(s.block_spans[2 * w - 1 - r]) for r in range(w))
    elif method == "ulysses":
        local = math.ceil(prompt_len / w)
    else:
        local = prompt_len

    costs: dict[int, AttentionCost] = {}
    for p in per_layer:
        if p in costs:
            continue
        if method == "dense":
            cost = _dense_attention(shape, cl, prompt_len)
        elif method == "ring":
            cost = _ring_attention(shape, cl, prompt_len)
        elif method == "ulysses":
            cost = _ulysses_attention(shape, cl, prompt_len)
            if isinstance(cost, str):
                return Prediction(method, False, cost, local_tokens=local, budgets=budgets)
        else:
            cost = _apb_attention(shape, cl, seq, p, overlap=method == "apbv", method=method)
        costs[p] = cost

    linear_flops = shape.linear_flops(local)
    weight_bytes = shape.layer_params * shape.dtype_bytes
    linear = max(linear_flops / cl.matmul_rate, weight_bytes / cl.mem_bw) if linear_flops else 0.0
    elementwise = (cl.software["elementwise_factor"] * shape.elementwise_elems * shape.dtype_bytes * local
                   * shape.batch / cl.mem_bw)
    head = 0.0
    if not shape.attention_only:  # embedding gather, final norm, LM head on the last token
        head = (shape.vocab * shape.hidden * shape.dtype_bytes + local * shape.hidden * shape.dtype_bytes
                * shape.batch) / cl.mem_bw
    layers = [costs[p] for p in per_layer]
    total = sum(c.seconds for c in layers) + shape.layers * (linear + elementwise) + head
    nl = shape.layers
    memory = (shape.params * shape.dtype_bytes + shape.activation_bytes(local)
              + max(c.extra_bytes for c in layers))
    return Prediction(
        method=method,
        feasible=True,
        seconds=total,
        layer_ms=1e3 * (total - head) / nl,
        attention_ms=1e3 * sum(c.seconds for c in layers) / nl,
        attention_compute_ms=1e3 * sum(c.compute_s for c in layers) / nl,
        comm_ms=1e3 * sum(c.comm_s for c in layers) / nl,
        exposed_comm_ms=1e3 * sum(max(0.0, c.seconds - c.compute_s) for c in layers) / nl,
        linear_ms=1e3 * linear,
        elementwise_ms=1e3 * elementwise,
        local_tokens=local,
        attention_tflop_per_rank=sum(c.flops for c in layers) / 1e12,
        linear_tflop_per_rank=nl * linear_flops / 1e12,
        comm_gb_per_rank=sum(c.comm_bytes for c in layers) / 1e9,
        memory_gb=memory / 1e9,
        fits_memory=memory <= 0.9 * cl.memory_bytes,
        budgets=budgets,
    )


def predict_all(shape: ModelShape, cluster: Cluster, prompt_len: int, *, anchor_len: int, query_len: int,
                passing: int | Sequence[int]) -> dict[str, Prediction]:
    return {
        m: predict(m, shape, cluster, prompt_len, anchor_len=anchor_len, query_len=query_len, passing=passing)
        for m in METHODS
    }


# ----------------------------------------------------------------------------------
# profiles
# ----------------------------------------------------------------------------------


class Profiles:
    """The YAML profiles (``configs/costmodel.yaml``) as a plain nested dict, plus accessors."""

    def __init__(self, data: dict, source: Optional[Path] = None):
        self.data = data
        self.source = source

    @classmethod
    def load(cls, path: Optional[str | Path] = None) -> "Profiles":
        path = Path(path) if path else DEFAULT_PROFILES
        return cls(yaml.safe_load(path.read_text()), path)

    @property
    def gpu_names(self) -> list[str]:
        return list(self.data["gpus"])

    @property
    def interconnect_names(self) -> list[str]:
        return list(self.data["interconnects"])

    def get(self, key: str):
        node = self.data
        for part in key.split("."):
            node = node[part]
        return node

    def with_value(self, key: str, value) -> "Profiles":
        data = copy.deepcopy(self.data)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
        return Profiles(data, self.source)

    def cluster(self, gpu: str, interconnect: str, gpus: int, gpus_per_node: int = 8) -> Cluster:
        if gpu not in self.data["gpus"]:
            raise ValueError(f"unknown GPU {gpu!r}; profiles: {', '.join(self.gpu_names)}")
        if interconnect not in self.data["interconnects"]:
            raise ValueError(f"unknown interconnect {interconnect!r}; profiles: {', '.join(self.interconnect_names)}")
        if gpus < 1 or gpus_per_node < 1:
            raise ValueError(f"gpus={gpus} and gpus_per_node={gpus_per_node} must be >= 1")
        return Cluster(gpu, self.data["gpus"][gpu], interconnect, self.data["interconnects"][interconnect],
                       self.data["software"], gpus, gpus_per_node)


# ----------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------


@dataclass
class Point:
    """One measured time and how the model predicts it."""

    name: str
    parameter: str  # the profile key this point's group fits ("" = shown, not fitted)
    measured_s: float
    predict: Callable[[Profiles], float]
    used: bool = True
    note: str = ""


def _read(path: Path):
    if not path.is_file():
        return None
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def calibration_points(profiles: Profiles, root: Path = ROOT) -> list[Point]:
    """The measured points named in ``calibration`` of the profiles, in fitting order."""
    cal = profiles.data.get("calibration", {})
    points: list[Point] = []
    gemm, apb, sdpa = [], [], []
    for rel in cal.get("kernel_benchmarks", []):
        bench = _read(root / rel)
        if bench is None:
            continue
        tag = Path(rel).stem
        s = bench["shapes"]
        shape = ModelShape.attention(s["hq"], s["hkv"], s["d"])
        if "matmul_bf16_tflops" in bench:  # the benchmark's GEMM: time of 1 PFLOP at the measured rate
            gemm.append(Point(f"{tag}: bf16 GEMM rate", "gpus.h100.matmul_tflops",
                              1e15 / (bench["matmul_bf16_tflops"] * 1e12),
                              lambda p: 1e15 / (p.get("gpus.h100.matmul_tflops") * 1e12)))
        for row in bench["lengths"]:
            L, n_keys = row["L"], row["n_pass"] + row["anchor"]

            def kernel_time(p, pairs=row["visible_pairs"], kernel="apb"):
                return shape.attention_flops(pairs) / (p.get(f"gpus.h100.attention_tflops.{kernel}") * 1e12)

            apb.append(Point(f"{tag}: APB-V kernel, L={L // 1024}K", "gpus.h100.attention_tflops.apb",
                             row["ours_ms"] / 1e3, kernel_time))
            sdpa.append(Point(f"{tag}: SDPA causal L x L, L={L // 1024}K", "gpus.h100.attention_tflops.sdpa",
                              row["sdpa_causal_ms"] / 1e3,
                              lambda p, L=L: kernel_time(p, causal_pairs(L), "sdpa")))
            sdpa.append(Point(f"{tag}: SDPA dense L x {n_keys}, L={L // 1024}K", "gpus.h100.attention_tflops.sdpa",
                              row["sdpa_dense_ms"] / 1e3,
                              lambda p, L=L, k=n_keys: kernel_time(p, L * k, "sdpa")))
    points += gemm + apb + sdpa

    for fact in cal.get("facts", []):
        shape = ModelShape.attention(fact["heads"], fact["kv_heads"], fact["head_dim"])
        method = fact["method"]
        parameter = f"gpus.{fact['gpu']}.attention_tflops.sdpa" if method == "dense" else "software.ring_efficiency"

        def fact_time(p, f=fact, shape=shape):
            cl = p.cluster(f["gpu"], f.get("interconnect", "nvlink"), f.get("gpus", 1))
            return predict(f["method"], shape, cl, f["tokens"]).seconds

        points.append(Point(fact["name"], parameter, fact["seconds"], fact_time))

    whole = cal.get("whole_model")
    runs = _read(root / whole["file"]) if whole else None
    if runs:
        from megatron_apbv.runtime.loading import load_config

        cfg = load_config(root / whole["config"])
        shape = ModelShape.from_config(cfg)
        for i, run in enumerate(runs, start=1):
            def model_time(p, n=run["prompt_tokens"]):
                return predict("dense", shape, p.cluster(whole["gpu"], "nvlink", 1), n).seconds

            used = i not in whole.get("exclude_lines", [])
            points.append(Point(
                f"whole model dense, {cfg.model.num_layers} layers, {run['prompt_tokens']} tokens (line {i})",
                "software.elementwise_factor", run["dense_seconds"], model_time, used,
                "" if used else "excluded: 7x slower than the other runs",
            ))
    return points


def _fit_scalar(loss: Callable[[float], float], lo: float, hi: float, iters: int = 100) -> float:
    """Minimise ``loss`` over ``[lo, hi]`` by golden-section search in log space."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(math.exp(c)), loss(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(math.exp(d))
    return math.exp((a + b) / 2)


FIT_RANGES = {  # bounds of each free parameter (the fit must land strictly inside)
    "matmul_tflops": (50.0, 2000.0),
    "attention_tflops": (20.0, 2000.0),
    "ring_efficiency": (0.05, 2.0),
    "elementwise_factor": (0.01, 200.0),
}


@dataclass
class Calibration:
    profiles: Profiles  # fitted
    fitted: dict  # parameter -> value
    rows: list[dict]  # one per point: measured, predicted before / after the fit, error

    @property
    def max_abs_error_pct(self) -> float:
        return max((abs(r["error_pct"]) for r in self.rows if r["used_in_fit"]), default=0.0)

    def table(self) -> str:
        head = f"{'point':<62} {'parameter':<34} {'meas ms':>9} {'uncal ms':>9} {'pred ms':>9} {'err %':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mark = "" if r["used_in_fit"] else "  (not fitted: " + r["note"] + ")"
            lines.append(f"{r['point'][:62]:<62} {r['parameter']:<34} {r['measured_ms']:>9.2f} "
                         f"{r['uncalibrated_ms']:>9.2f} {r['predicted_ms']:>9.2f} {r['error_pct']:>+7.1f}{mark}")
        lines.append("fitted: " + ", ".join(f"{k} = {v:.4g}" for k, v in self.fitted.items()))
        return "\n".join(lines)


def calibrate(profiles: Optional[Profiles] = None, points: Optional[list[Point]] = None,
              root: Path = ROOT) -> Calibration:
    """Fit each free parameter to its group of measured points, in order.

    For each parameter ``theta`` (in the order the groups appear: GEMM rate,
    attention rates, ring efficiency, non-matmul factor) minimise
    ``sum_i (log t_pred_i(theta) - log t_meas_i)^2`` over the points of its
    group, holding the parameters fitted before it. Rates enter as
    ``t = FLOPs / rate``, so for them the optimum is the geometric mean of the
    measured rates; the other two are found by the same 1-D search. Then
    ``same_as_after_fit`` copies fits to GPUs that have no measurement.
    """
    base = profiles or Profiles.load()
    points = calibration_points(base, root) if points is None else points
    fitted_profiles = base
    fitted: dict = {}
    for parameter in dict.fromkeys(p.parameter for p in points if p.used and p.parameter):
        group = [p for p in points if p.used and p.parameter == parameter]
        lo, hi = next(v for k, v in FIT_RANGES.items() if k in parameter)

        def loss(theta, group=group, parameter=parameter, prof=fitted_profiles):
            trial = prof.with_value(parameter, theta)
            return sum((math.log(p.predict(trial)) - math.log(p.measured_s)) ** 2 for p in group)

        value = _fit_scalar(loss, lo, hi)
        fitted[parameter] = value
        fitted_profiles = fitted_profiles.with_value(parameter, value)
        # copy right away, so that later groups (e.g. the whole model on another GPU) use it
        for gpu, spec in fitted_profiles.data["gpus"].items():
            for key, source in (spec.get("same_as_after_fit") or {}).items():
                if f"gpus.{source}.{key}" == parameter:
                    fitted_profiles = fitted_profiles.with_value(f"gpus.{gpu}.{key}", value)
    rows = []
    for p in points:
        pred, uncal = p.predict(fitted_profiles), p.predict(base)
        rows.append({
            "point": p.name, "parameter": p.parameter, "measured_ms": 1e3 * p.measured_s,
            "uncalibrated_ms": 1e3 * uncal, "predicted_ms": 1e3 * pred,
            "error_pct": 100.0 * (pred / p.measured_s - 1.0), "used_in_fit": p.used, "note": p.note,
        })
    return Calibration(fitted_profiles, fitted, rows)


@lru_cache(maxsize=4)
def calibrated_profiles(path: Optional[str] = None) -> Calibration:
    """Load and calibrate the profiles once per process."""
    return calibrate(Profiles.load(path))


if __name__ == "__main__":  # python -m megatron_apbv.costmodel.model: the calibration table
    print(calibrate().table())
