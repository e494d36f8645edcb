"""Which backend runs each part of APB-V's block attention on CUDA: the choice, and the measurements behind it.

:func:`megatron_apbv.apbv.attend.apb_attention` computes queries ``[A | B]`` over
keys ``[passing | anchor | block]``. On CUDA it has three parts, each with its own
backend:

* ``block_rows`` (the B rows): cuDNN's fused attention can express them as two
  calls, causal over the block's own keys (``is_causal``, which is top-left
  aligned, so only when the block has as many keys as rows) and dense over
  ``[passing | anchor]``, merged by log-sum-exp. Route ``cudnn``; else ``triton``
  (our fused kernel, one call over all three segments);
* ``anchor_rows`` (the A rows of the first block: causal over the anchor only):
  ``triton`` (they are a small ``a x a`` triangle);
* few query rows over many keys (the query partial, decoding): ``triton_split_keys``.

The choice is made from :data:`MEASURED`: per (GPU generation, head dim) the
TFLOP/s of both routes on the same work (``benchmarks/bench_kernels.py``, which
writes the numbers into ``benchmarks/results/kernels_<gpu>.json``). cuDNN is
taken only for a generation and head dim measured faster there, from the
smallest block length where it was. Everything else (other GPUs, head dims not
measured, torch without the cuDNN op, cuDNN off) takes the Triton kernel: that
is the recorded choice, not a fallback, and :func:`describe` reports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CUDNN = "cudnn"
TRITON = "triton"
TRITON_SPLIT_KEYS = "triton_split_keys"
TORCH = "torch"

# Query tokens and decoded tokens are few rows over many keys: one kernel launch would
# then run only (heads x one row tile) programs, far too few for the GPU. Splitting the
# keys into chunks that ride along the batch dimension fills it (split-K, then LSE merge).
FEW_QUERY_ROWS = 128
KEY_CHUNK = 4096

# (compute capability major, head dim) -> block-work TFLOP/s (visible pairs) of both routes at block lengths L
# with n_pass + anchor prefix keys (W = 2 defaults, bench_kernels.py `workload`), bf16, and the smallest L from
# which cuDNN is taken (null: Triton at every length). The numbers live in attention_routes_measured.json, which
# bench_kernels.py rewrites from its measurement (its `route_table` output): the table is data, not code.
MEASURED_FILE = Path(__file__).with_name("attention_routes_measured.json")


def load_measured(path: Path = MEASURED_FILE) -> dict:
    """The route table ``{(generation, head_dim): entry}`` of a ``attention_routes_measured.json`` file."""
    raw = json.loads(path.read_text())
    table = {}
    for key, entry in raw.items():
        gen, d = (int(x) for x in key.split("/"))
        table[(gen, d)] = {**entry, "tflops": {int(L): r for L, r in entry.get("tflops", {}).items()}}
    return table


MEASURED = load_measured()


def cudnn_op_available() -> bool:
    """torch has the cuDNN fused-attention op (returning the log-sum-exp) and cuDNN is usable."""
    return (
        hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
        and torch.backends.cudnn.is_available()
        and torch.backends.cudnn.enabled
    )


def cudnn_native_gqa(device: torch.device, head_dim: int) -> bool:
    """The cuDNN op was measured to take fewer K/V heads than query heads on this GPU generation and head dim."""
    return bool(MEASURED.get((_generation(device), head_dim), {}).get("cudnn_native_gqa", False))


def _generation(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def block_rows_route(device: torch.device, dtype: torch.dtype, head_dim: int, block_rows: int, n_block: int) -> str:
    """Backend of the block rows: ``cudnn`` where measured faster and expressible, else ``triton``."""
    if device.type != "cuda":
        return TORCH
    if dtype not in (torch.bfloat16, torch.float16) or block_rows != n_block or block_rows == 0:
        return TRITON
    entry = MEASURED.get((_generation(device), head_dim))
    if entry is None or entry.get("cudnn_from_rows") is None or block_rows < entry["cudnn_from_rows"]:
        return TRITON
    if not cudnn_op_available():
        return TRITON
    return CUDNN


@dataclass(frozen=True)
class Route:
    """The backend of each part of one :func:`apb_attention` call (None: the part is empty)."""

    anchor_rows: str | None
    block_rows: str | None

    def __str__(self) -> str:
        parts = [f"anchor rows: {self.anchor_rows}"] if self.anchor_rows else []
        if self.block_rows:
            parts.append(f"block rows: {self.block_rows}")
        return "; ".join(parts) or "empty"


def route_for(
    device: torch.device, dtype: torch.dtype, head_dim: int, *, rows: int, anchor_rows: int, n_pass: int,
    n_anchor: int, n_block: int,
) -> Route:
    """The :class:`Route` that :func:`apb_attention` takes for these shapes (CPU: torch)."""
    if device.type != "cuda":
        return Route(TORCH if anchor_rows else None, TORCH if rows > anchor_rows else None)
    from megatron_apbv.apbv.kernels_dispatch import kernels_disabled

    if kernels_disabled():
        return Route(TORCH if anchor_rows else None, TORCH if rows > anchor_rows else None)
    block_rows = rows - anchor_rows
    if anchor_rows == 0 and rows <= FEW_QUERY_ROWS and n_pass + n_anchor >= 2 * KEY_CHUNK:
        return Route(None, TRITON_SPLIT_KEYS)
    block = block_rows_route(device, dtype, head_dim, block_rows, n_block) if block_rows else None
    return Route(TRITON if anchor_rows else None, block)


def describe_layer(layout, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """``attention_backend`` of an APB-V layer on ``layout``'s rank: the route of each part, as text.

    The same shapes :func:`megatron_apbv.apbv.attention.apbv_layer_attention` passes,
    so the report is what runs (passing keys only change the prefix length, which
    no route depends on except the query partial's split).
    """
    blocks = layout.local_block_slices()
    out = {}
    for e, ((virtual, _), rows) in enumerate(zip(layout.blocks, blocks)):
        n = rows.stop - rows.start
        first = e == 0
        route = route_for(device, dtype, head_dim, rows=n + (layout.anchor_len if first else 0),
                          anchor_rows=layout.anchor_len if first else 0, n_pass=0, n_anchor=layout.anchor_len,
                          n_block=n)
        out[f"block{e}"] = str(route)
    query, share = layout.local_query_slice, layout.anchor_share
    q = query.stop - query.start
    keys = query.start - layout.anchor_len + share.stop - share.start
    out["query_partial"] = str(route_for(device, dtype, head_dim, rows=q, anchor_rows=0, n_pass=keys, n_anchor=0,
                                         n_block=q if layout.holds_query_keys else 0))
    return out
