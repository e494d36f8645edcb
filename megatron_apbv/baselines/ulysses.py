"""All-to-all (DeepSpeed-Ulysses) sequence-parallel attention: a benchmark baseline.

Layout: the prompt of ``N`` tokens is cut into ``W`` contiguous chunks of
``c = ceil(N / W)`` tokens; rank ``r`` holds ``[r c, (r+1) c)``. The all-to-all
needs the same local length on every rank, so the chunks are padded *at the end
of the sequence* (the last rank(s) hold fewer real tokens, or none): a padded
token repeats token ``N-1`` and, lying after every real token, is never seen by a
real query under the causal mask. Its output is garbage and is dropped.

Attention: DeepSpeed's :class:`deepspeed.sequence.layer.DistributedAttention`
scatters the heads and gathers the sequence (all-to-all over Megatron's CP group),
every rank runs exact causal attention over the *whole* (padded) sequence for
``hq / W`` query heads and ``hkv / W`` KV heads, and a second all-to-all returns
the rank's rows with all heads.

Heads: ``hq`` must divide by ``W`` (the query heads are split). GQA keeps each
query head with its KV head as long as ``hkv`` divides by ``W`` too; when it does
not (Qwen2.5-VL-7B's 4 KV heads on 3 ranks), every KV head is repeated ``f``
times, ``f`` the smallest divisor of the GQA ratio with ``hkv f`` divisible by
``W`` (at worst ``f = hq / hkv``: plain multi-head attention). That moves ``f``
times more K/V through the all-to-all, the known cost of Ulysses under GQA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_apbv.apbv.attend import apb_attention
from megatron_apbv.apbv.core_attention import CoreAttentionBase, RankPlan

LOCAL_KERNELS = ("sdpa", "apb")


@dataclass(frozen=True)
class ContiguousLayout:
    """``W`` contiguous chunks of ``ceil(N / W)`` tokens, padded at the end of the sequence."""

    prompt_len: int
    world_size: int

    def __post_init__(self):
        if self.prompt_len < 1 or self.world_size < 1:
            raise ValueError(f"prompt_len={self.prompt_len} and world_size={self.world_size} must be >= 1")

    @property
    def chunk(self) -> int:
        """Local (padded) length of every rank."""
        return -(-self.prompt_len // self.world_size)

    def real_len(self, rank: int) -> int:
        """Real (unpadded) tokens of ``rank``."""
        return max(0, min(self.chunk, self.prompt_len - rank * self.chunk))

    def padded_indices(self, rank: int) -> torch.Tensor:
        """Global token index of every local token; padding repeats token ``N-1``."""
        return torch.arange(rank * self.chunk, (rank + 1) * self.chunk).clamp(max=self.prompt_len - 1)

    def owner_of(self, token: int) -> tuple[int, int]:
        """``(rank, local index)`` of global token ``token``."""
        return token // self.chunk, token % self.chunk


@dataclass(frozen=True)
class UlyssesMask:
    """Structured causal mask of Ulysses attention: the contiguous layout and this rank."""

    layout: ContiguousLayout
    rank: int


def kv_repeat_factor(q_heads: int, kv_heads: int, world: int) -> int:
    """How many times to repeat each KV head so that the KV heads divide by ``world``."""
    if q_heads % world:
        raise ValueError(
            f"Ulysses attention splits the {q_heads} query heads over {world} ranks: the heads must divide by "
            f"the context-parallel size (choose parallel.context_parallel_size among the divisors of {q_heads})"
        )
    group = q_heads // kv_heads
    return next(f for f in range(1, group + 1) if group % f == 0 and (kv_heads * f) % world == 0)


# Said once, before DeepSpeed's comm start-up, so that the pause is not mistaken for a hang.
CPU_COMPILE_NOTE = (
    "ulysses: DeepSpeed's comm start-up compiles its shared-memory (shm) op once per machine "
    "(~1-2 min on a few CPU cores; cached in ~/.cache/torch_extensions afterwards)"
)


def deepspeed_comm_ready() -> bool:
    """Whether ``deepspeed.comm`` is running already (its start-up, with the shm op, is behind us)."""
    import deepspeed.comm as ds_comm

    return ds_comm.is_initialized()


def _init_deepspeed_comm() -> None:
    """Let deepspeed.comm use the process group that is already running (torch.distributed)."""
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    # On the CPU accelerator DeepSpeed JIT-compiles its shared-memory all-reduce here (tens of
    # seconds, once per machine, cached in ~/.cache/torch_extensions); Ulysses only needs
    # all_to_all_single, but we leave DeepSpeed's start-up as it is.
    ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


class _LocalCausalAttention(torch.nn.Module):
    """Exact causal attention of the gathered sequence for this rank's heads (seq-first in and out)."""

    def __init__(self, softmax_scale: float, kernel: str):
        super().__init__()
        if kernel not in LOCAL_KERNELS:
            raise ValueError(f"local attention kernel {kernel!r}: expected one of {LOCAL_KERNELS}")
        self.softmax_scale, self.kernel = softmax_scale, kernel

    def forward(self, q, k, v):
        if self.kernel == "apb":
            none = k[:0]
            out, _ = apb_attention(q, none, none, none, none, k, v, anchor_rows=0, softmax_scale=self.softmax_scale)
            return out
        qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # SDPA: [b, h, s, d]
        out = F.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[2] != k.shape[2]
        )
        return out.permute(2, 0, 1, 3)


def ulysses_attention_module(softmax_scale: float, group, kernel: str = "sdpa"):
    """DeepSpeed's ``DistributedAttention`` around an exact causal local attention over ``group``."""
    from deepspeed.sequence.layer import DistributedAttention

    _init_deepspeed_comm()
    return DistributedAttention(_LocalCausalAttention(softmax_scale, kernel), group, scatter_idx=2, gather_idx=0)


def ulysses_attention(q, k, v, module, world: int) -> torch.Tensor:
    """Run ``module`` (from :func:`ulysses_attention_module`) on seq-first local ``q``/``k``/``v``."""
    f = kv_repeat_factor(q.shape[2], k.shape[2], world)
    if f > 1:
        k, v = k.repeat_interleave(f, dim=2), v.repeat_interleave(f, dim=2)
    return module(q.contiguous(), k.contiguous(), v.contiguous(), 1)  # batch_dim_idx=1: [s, b, h, d]


class UlyssesCoreAttention(CoreAttentionBase):
    """Ulysses all-to-all attention as Megatron's ``core_attention`` (the constructor of every core attention here).

    ``attention_mask`` must be a :class:`UlyssesMask`; ``kernel`` picks the local
    attention (``sdpa``: PyTorch SDPA, flash on GPUs; ``apb``: the APB attention
    function with block keys only, the Triton kernel on GPUs).
    """

    def __init__(self, *args, kernel: str = "sdpa", **kwargs):
        super().__init__(*args, **kwargs)
        self.world = dist.get_world_size(self.cp_group)
        self.attention = ulysses_attention_module(self.softmax_scale, self.cp_group, kernel)

    @classmethod
    def rank_plan(cls, cfg, rank: int, world: int) -> RankPlan:
        """Contiguous chunks of ``ceil(N / W)`` tokens, the last one padded."""
        flat = ContiguousLayout(cfg.prompt_len, world)
        owner, row = flat.owner_of(cfg.prompt_len - 1)
        return RankPlan(flat.padded_indices(rank), UlyssesMask(flat, rank), owner, row)

    @classmethod
    def unsupported(cls, cfg, world: int) -> Optional[str]:
        try:
            kv_repeat_factor(cfg.model.num_attention_heads, cfg.model.num_query_groups, world)
        except ValueError:
            return f"{cfg.model.num_attention_heads} query heads do not divide by {world} ranks"
        return None

    @classmethod
    def startup_note(cls, device: torch.device) -> Optional[str]:
        """On CPUs DeepSpeed's comm start-up compiles its shm op first (:data:`CPU_COMPILE_NOTE`)."""
        return CPU_COMPILE_NOTE if device.type == "cpu" and not deepspeed_comm_ready() else None

    def forward(self, query, key, value, attention_mask: UlyssesMask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        self.reject_bias_and_packing("Ulysses attention", attention_bias, packed_seq_params)
        if not isinstance(attention_mask, UlyssesMask):
            raise TypeError(
                f"UlyssesCoreAttention needs attention_mask=UlyssesMask(...); got {type(attention_mask).__name__}"
            )
        if query.shape[0] != attention_mask.layout.chunk:
            raise ValueError(f"local sequence has {query.shape[0]} tokens, the layout says {attention_mask.layout.chunk}")
        out = ulysses_attention(query, key, value, self.attention, self.world)
        return out.reshape(out.shape[0], out.shape[1], -1)
