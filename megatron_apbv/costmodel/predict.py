"""Prefill time model (``apbv plan``): dense, ring (zigzag), Ulysses, Star, APB-like and APB-V.

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

Rates are achieved rates from ``megatron_apbv/costmodel/profiles.yaml``; :func:`calibrate` fits
the free ones to the measured points (one parameter per group of measurements,
least squares in log time). It is a time model only: it says nothing about the
accuracy of an approximate method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.costmodel.attention import AttentionCost
from megatron_apbv.costmodel.shapes import Cluster, ModelShape
from megatron_apbv.methods import get_method


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
    chosen = get_method(method)
    w = 1 if chosen.single_process else cluster.gpus
    cl = Cluster(cluster.gpu_name, cluster.gpu, cluster.link_name, cluster.link, cluster.software, w,
                 cluster.gpus_per_node)
    per_layer = [passing] * shape.layers if isinstance(passing, int) else list(passing)
    if len(per_layer) != shape.layers:
        raise ValueError(f"{len(per_layer)} passing budgets for {shape.layers} layers")
    budgets: dict = {}
    seq = None
    if chosen.variant is not None:
        seq = SequenceLayout(prompt_len, anchor_len, query_len, w, zigzag=chosen.setting("zigzag"))
        fixed = chosen.fixed_passing(prompt_len)
        if fixed is not None:  # Star (0) and exact (every key) ignore the budgets given
            per_layer = [fixed] * shape.layers
        budgets = {"anchor": anchor_len, "passing": per_layer[0] if len(set(per_layer)) == 1 else per_layer,
                   "query": query_len}
    local = chosen.cost_local_tokens(prompt_len, w, seq)

    costs: dict[int, AttentionCost] = {}
    for p in per_layer:
        if p in costs:
            continue
        cost = chosen.cost_function()(shape, cl, prompt_len, seq, p, method)
        if isinstance(cost, str):
            return Prediction(method, False, cost, local_tokens=local, budgets=budgets)
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
