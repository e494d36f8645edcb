"""Our Qwen2.5-VL vision tower, written for inference (the tower ``apbv run/generate/infer`` and the bench use).

It computes what ``transformers``' ``Qwen2_5_VisionTransformerPretrainedModel``
computes (CPU tests: fp32 within 1e-4) from the same ``visual.*`` weights under
the same state-dict names, with the work arranged for GPUs:

* The window permutation is applied once per video: patches are reordered into
  window order before the patch embedding (a plain matmul: the Conv3d's stride
  equals its kernel), the rotary tables are built in that order, and the merged
  tokens are put back in input order after the merger. Full-attention blocks do
  not care about the order inside a temporal group, so no block reorders.
* Attention runs over all segments of a block in one call: full attention over
  runs of equal-length segments (every temporal group of a video: one dense SDPA
  call, cuDNN on Hopper), windows through flash-attention's varlen kernel
  (``cu_seqlens``) for fp16/bf16 CUDA tensors, else one padded, masked SDPA call.
* qkv is one GEMM (as in the checkpoint); gate and up are one GEMM; the MLP width
  is zero-padded to a multiple of 64 (3420 -> 3456 in Qwen2.5-VL-7B), because an
  odd leading dimension keeps cuBLAS off its Hopper kernels. The padding rows and
  columns are zero, so the result is unchanged; the state dict hides them (the
  module saves and loads transformers' ``gate_proj``/``up_proj``/``down_proj``).
* The residual adds happen inside the projection GEMMs (``addmm_``), the pending
  bias is added by the next norm, and the elementwise chains (bias + RMSNorm,
  RoPE on q and k in place, SiLU * up) are one Triton kernel each on CUDA
  (``kernels/vision_elementwise.py``); CPU tensors (and ``APBV_DISABLE_KERNELS=1``)
  take the torch code below, which defines them.

Everything that depends only on ``grid_thw`` (window order, rotary tables,
segment bounds) is a :class:`TowerPlan`, built once per video shape and kept in
a small per-tower cache. No step compiles per shape (lengths are kernel
arguments), so the first call of a new shape only builds its plan.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_apbv.apbv.kernels_dispatch import kernel_for

MLP_PAD = 64  # the MLP width is padded to a multiple of this (Hopper GEMM tiles, 16-byte aligned rows)


@dataclass(frozen=True)
class VisionTowerConfig:
    """The fields of a ``Qwen2_5_VLVisionConfig`` the tower uses (same names)."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"vision hidden_size={self.hidden_size} must split into num_heads={self.num_heads} "
                             "heads of an even head_dim")
        if self.hidden_act != "silu":
            raise ValueError(f"vision hidden_act={self.hidden_act!r}: the tower implements 'silu' (Qwen2.5-VL)")
        if self.window_size < self.patch_size * self.spatial_merge_size:
            raise ValueError(f"vision window_size={self.window_size} must be >= patch_size * spatial_merge_size = "
                             f"{self.patch_size * self.spatial_merge_size}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision fullatt_block_indexes {bad} are not blocks of a depth-{self.depth} tower")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window_tokens(self) -> int:
        """Merged tokens per window side."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_any(cls, config=None, **overrides) -> "VisionTowerConfig":
        """From a ``Qwen2_5_VLVisionConfig``, a dict of its fields, ours, or ``None`` (7B defaults); plus overrides."""
        if isinstance(config, cls) and not overrides:
            return config
        values = {}
        if isinstance(config, dict):
            values.update(config)
        elif config is not None:
            values.update({f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})
            rope = getattr(config, "rope_parameters", None) or {}
            if "rope_theta" in rope:
                values["rope_theta"] = rope["rope_theta"]
        values.update(overrides)
        rope = values.pop("rope_parameters", None) or {}
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope["rope_theta"])
        known = {f.name for f in fields(cls)}
        out = {}
        for k, v in values.items():
            if k not in known:
                continue
            if isinstance(v, (list, tuple)) and k != "fullatt_block_indexes":
                if len(set(v)) != 1:
                    raise ValueError(f"vision config {k}={v}: only square / uniform sizes are supported")
                v = v[0]
            out[k] = tuple(int(i) for i in v) if k == "fullatt_block_indexes" else v
        return cls(**out)


# --------------------------------------------------------------------------------------------------
# the elementwise chains: torch definitions (CPU) and their Triton kernels (CUDA)
# --------------------------------------------------------------------------------------------------


def bias_rms_norm(h: torch.Tensor, bias: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += bias`` in place (if given); returns ``weight * rms_norm(h)`` rounded as transformers' RMSNorm."""
    kernel = kernel_for("vision_bias_rms_norm", h)
    if kernel is not None:
        return kernel(h, bias, weight, eps)
    if bias is not None:
        h.add_(bias)
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q and k of ``qkv [N, 3, heads, D]`` in place; ``cos``/``sin`` are fp32 ``[N, D/2]`` (both halves)."""
    kernel = kernel_for("vision_rope_qk_", qkv)
    if kernel is not None:
        return kernel(qkv, cos, sin)
    half = qkv.shape[-1] // 2
    qk = qkv[:, :2].float()
    x1, x2 = qk[..., :half], qk[..., half:]
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    qkv[:, :2] = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)
    return qkv


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up [N, 2 * I]`` (gate first) -> ``[N, I]``."""
    kernel = kernel_for("vision_silu_mul", gate_up)
    if kernel is not None:
        return kernel(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# the plan of one grid: window order, rotary tables, segments
# --------------------------------------------------------------------------------------------------


@dataclass
class Segments:
    """Attention segments over the (window-ordered) patches of one call."""

    lengths: tuple[int, ...]  # host copy, in order, no empty segments
    cu_seqlens: torch.Tensor  # int32 [len(lengths) + 1], on the tower's device
    max_len: int
    runs: tuple[tuple[int, int, int], ...]  # (start, count, length): maximal runs of equal lengths
    _padded: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @classmethod
    def of(cls, lengths: Sequence[int], device) -> "Segments":
        lengths = tuple(int(n) for n in lengths if n > 0)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        runs, start = [], 0
        for n in lengths:
            if runs and runs[-1][2] == n:
                s, c, _ = runs[-1]
                runs[-1] = (s, c + 1, n)
            else:
                runs.append((start, 1, n))
            start += n
        return cls(lengths, cu.to(device=device, dtype=torch.int32), max(lengths, default=0), tuple(runs))

    def padded(self):
        """``(index [segments, max_len], valid [segments, max_len])`` for the padded, masked path (built once)."""
        if self._padded is None:
            device = self.cu_seqlens.device
            starts = self.cu_seqlens[:-1].long()[:, None]
            offs = torch.arange(self.max_len, device=device)[None, :]
            valid = offs < torch.tensor(self.lengths, device=device)[:, None]
            index = (starts + offs).clamp_max(int(self.cu_seqlens[-1]) - 1)
            self._padded = (index, valid)
        return self._padded


@dataclass
class TowerPlan:
    """What one ``grid_thw`` fixes: patch order, rotary tables and the attention segments."""

    num_patches: int
    unit_order: torch.Tensor  # [units]: input merge unit at each window-ordered position
    unit_restore: torch.Tensor  # [units]: window-ordered position of each input unit (inverse permutation)
    cos: torch.Tensor  # fp32 [patches, head_dim / 2], window order
    sin: torch.Tensor
    windows: Segments
    full: Segments  # one segment per temporal group


def _item_windows(h: int, w: int, merge: int, vw: int):
    """Window order of one temporal group's ``(h / merge) x (w / merge)`` merge units and its window sizes (units).

    Windows of ``vw x vw`` units tile the grid from the top-left corner (the last row and column of windows may
    be short); windows are taken row by row, units inside a window row by row.
    """
    hm, wm = h // merge, w // merge
    br = torch.arange(hm)[:, None].expand(hm, wm)
    bc = torch.arange(wm)[None, :].expand(hm, wm)
    window = ((br // vw) * (-(-wm // vw)) + bc // vw).reshape(-1)
    order = torch.sort(window, stable=True).indices  # row-major inside each window
    sizes = torch.bincount(window)
    return order, sizes


def build_plan(config: VisionTowerConfig, grid_thw, device) -> TowerPlan:
    """The :class:`TowerPlan` of ``grid_thw`` (``[items, 3]``: temporal groups, patch rows, patch columns)."""
    rows = [tuple(int(v) for v in row) for row in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
    m, unit = config.spatial_merge_size, config.spatial_merge_size ** 2
    half = config.head_dim // 2
    orders, hpos, wpos, window_units, group_patches = [], [], [], [], []
    offset = 0
    for t, h, w in rows:
        if t < 0 or h < 1 or w < 1 or h % m or w % m:
            raise ValueError(f"grid_thw row {(t, h, w)}: patch rows and columns must be positive multiples of "
                             f"spatial_merge_size={m}")
        order, sizes = _item_windows(h, w, m, config.window_tokens)
        wm, per_group = w // m, (h // m) * (w // m)
        # Position of every patch of one group, window order: unit (br, bc), patch (iy, ix) inside it.
        br, bc = order // wm, order % wm
        sub = torch.arange(unit)
        hp = (br[:, None] * m + sub[None, :] // m).reshape(-1)
        wp = (bc[:, None] * m + sub[None, :] % m).reshape(-1)
        for g in range(t):
            orders.append(order + offset + g * per_group)
        hpos.append(hp.repeat(t))
        wpos.append(wp.repeat(t))
        window_units.extend(sizes.tolist() * t)
        group_patches.extend([h * w] * t)
        offset += t * per_group
    num_units = offset
    unit_order = torch.cat(orders) if orders else torch.zeros(0, dtype=torch.long)
    restore = torch.empty_like(unit_order)
    restore[unit_order] = torch.arange(num_units)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
    hp = torch.cat(hpos) if hpos else torch.zeros(0, dtype=torch.long)
    wp = torch.cat(wpos) if wpos else torch.zeros(0, dtype=torch.long)
    hp, wp, inv_freq = hp.to(device), wp.to(device), inv_freq.to(device)
    angles = torch.cat((hp[:, None].float() * inv_freq, wp[:, None].float() * inv_freq), dim=-1)
    return TowerPlan(
        num_patches=num_units * unit,
        unit_order=unit_order.to(device),
        unit_restore=restore.to(device),
        cos=angles.cos().contiguous(),
        sin=angles.sin().contiguous(),
        windows=Segments.of([n * unit for n in window_units], device),
        full=Segments.of(group_patches, device),
    )


# --------------------------------------------------------------------------------------------------
# attention over segments
# --------------------------------------------------------------------------------------------------

_DENSE_RUNS = 8  # at most this many runs of equal-length segments: dense SDPA per run, else one varlen call


def _flash_varlen_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def segment_attention(qkv: torch.Tensor, segments: Segments, scale: float) -> torch.Tensor:
    """Attention inside each segment of ``qkv [N, 3, heads, D]`` (no mask inside a segment) -> ``[N, heads * D]``.

    Few runs of equal-length segments (full attention of a video): one dense SDPA
    call per run on views of ``qkv``. Otherwise (windows): flash-attention's varlen
    kernel on fp16/bf16 CUDA tensors, else one SDPA call over the segments padded
    to the longest with the padded keys masked.
    """
    n, _, heads, d = qkv.shape
    q, k, v = qkv.unbind(1)
    if len(segments.runs) <= _DENSE_RUNS:
        outs = []
        for start, count, length in segments.runs:
            qs, ks, vs = (t[start : start + count * length].view(count, length, heads, d).transpose(1, 2)
                          for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            outs.append(out.transpose(1, 2).reshape(count * length, heads * d))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    if _flash_varlen_ok(q):
        cu = segments.cu_seqlens
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, segments.max_len, segments.max_len, 0.0, False, False, scale=scale)[0]
        return out.reshape(n, heads * d)
    index, valid = segments.padded()
    qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [segments, heads, max_len, D]
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[valid].reshape(n, heads * d)  # real rows in segment order = token order


# --------------------------------------------------------------------------------------------------
# modules (attribute names = transformers' state-dict names)
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps


class VisionAttention(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        c = config.hidden_size
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate/up fused and the width zero-padded to :data:`MLP_PAD`.

    Parameters: ``gate_up_weight [2 * P, C]`` (gate rows ``[0, I)``, up rows
    ``[P, P + I)``), ``gate_up_bias [2 * P]``, ``down_weight [C, P]``,
    ``down_bias [C]`` with ``P = roundup(I, 64)``; rows and columns past ``I`` are
    zero and stay zero (nothing writes them). The state dict is transformers':
    ``gate_proj``/``up_proj``/``down_proj`` ``.weight``/``.bias``, saved as views of
    these parameters (so copying into them writes through) and loaded into them.
    """

    HF_NAMES = ("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias",
                "down_proj.weight", "down_proj.bias")

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.padded = -(-intermediate // MLP_PAD) * MLP_PAD
        self.gate_up_weight = nn.Parameter(torch.zeros(2 * self.padded, hidden))
        self.gate_up_bias = nn.Parameter(torch.zeros(2 * self.padded))
        self.down_weight = nn.Parameter(torch.zeros(hidden, self.padded))
        self.down_bias = nn.Parameter(torch.zeros(hidden))

    def hf_views(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """transformers' MLP tensors as views of the padded parameters."""
        i, p = self.intermediate, self.padded
        gw, gb, dw, db = (t if keep_vars else t.detach() for t in
                          (self.gate_up_weight, self.gate_up_bias, self.down_weight, self.down_bias))
        return {"gate_proj.weight": gw[:i], "gate_proj.bias": gb[:i], "up_proj.weight": gw[p : p + i],
                "up_proj.bias": gb[p : p + i], "down_proj.weight": dw[:, :i], "down_proj.bias": db}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, tensor in self.hf_views(keep_vars).items():
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        views = self.hf_views()
        for name, view in views.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            src = state_dict[key]
            if tuple(src.shape) != tuple(view.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(src.shape)}, "
                                  f"the shape in current model is {tuple(view.shape)}.")
                continue
            with torch.no_grad():
                view.copy_(src)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in views)


class VisionBlock(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        k = (config.temporal_patch_size, config.patch_size, config.patch_size)
        # Holds transformers' Conv3d weight; applied as the equivalent matmul (stride = kernel).
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=k, stride=k, bias=False)


class PatchMerger(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        width = config.hidden_size * config.spatial_merge_size ** 2
        self.ln_q = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.out_hidden_size))


class VisionTower(nn.Module):
    """Qwen2.5-VL's vision transformer: ``forward(patches [N, C*tp*p*p], grid_thw [items, 3])`` -> ``[N/4, out]``.

    ``patches`` and ``grid_thw`` are those of transformers' tower (the Qwen2-VL
    processor's layout, :func:`megatron_apbv.models.vision.patchify`); the output
    is one embedding per merged ``merge x merge`` patch group, in input order.
    """

    PLAN_CACHE = 4  # plans kept per tower (one per recent video shape)

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self._full = frozenset(config.fullatt_block_indexes)
        self._plans: OrderedDict = OrderedDict()

    def plan(self, grid_thw, device) -> TowerPlan:
        """The cached :class:`TowerPlan` of ``grid_thw`` on ``device``."""
        key = (tuple(map(tuple, torch.as_tensor(grid_thw).reshape(-1, 3).tolist())), str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(self.config, grid_thw, device)
            self._plans[key] = plan
            while len(self._plans) > self.PLAN_CACHE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        weight = self.patch_embed.proj.weight
        c, dtype, device = cfg.hidden_size, weight.dtype, weight.device
        plan = self.plan(grid_thw, device)
        k = weight[0].numel()
        if hidden_states.dim() != 2 or hidden_states.shape != (plan.num_patches, k):
            raise ValueError(f"patches of shape {tuple(hidden_states.shape)} for grid_thw "
                             f"{torch.as_tensor(grid_thw).tolist()}: expected [{plan.num_patches}, {k}] "
                             "(in_channels * temporal_patch * patch * patch)")
        n, unit = plan.num_patches, cfg.spatial_merge_size ** 2
        if n == 0:
            return torch.empty(0, cfg.out_hidden_size, dtype=dtype, device=device)
        x = hidden_states.to(device=device, dtype=dtype).view(n // unit, unit * k).index_select(0, plan.unit_order)
        h = F.linear(x.view(n, k), weight.view(c, k))  # the patch embedding, window order
        heads, d = cfg.num_heads, cfg.head_dim
        scale = d ** -0.5
        pending = None  # the bias of the last projection, added by the next norm
        for i, blk in enumerate(self.blocks):
            x = bias_rms_norm(h, pending, blk.norm1.weight, cfg.norm_eps)
            qkv = F.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias).view(n, 3, heads, d)
            rope_qk_(qkv, plan.cos, plan.sin)
            o = segment_attention(qkv, plan.full if i in self._full else plan.windows, scale)
            del qkv
            h.addmm_(o, blk.attn.proj.weight.t())
            x = bias_rms_norm(h, blk.attn.proj.bias, blk.norm2.weight, cfg.norm_eps)
            a = silu_mul(F.linear(x, blk.mlp.gate_up_weight, blk.mlp.gate_up_bias))
            h.addmm_(a, blk.mlp.down_weight.t())
            pending = blk.mlp.down_bias
        x = bias_rms_norm(h, pending, self.merger.ln_q.weight, cfg.norm_eps).view(n // unit, unit * c)
        fc1, fc2 = self.merger.mlp[0], self.merger.mlp[2]
        x = F.gelu(F.linear(x, fc1.weight, fc1.bias))
        return F.linear(x, fc2.weight, fc2.bias).index_select(0, plan.unit_restore)


def init_random_(tower: VisionTower, generator: Optional[torch.Generator] = None, std: float = 0.02) -> VisionTower:
    """transformers' initialisation scheme (matrices N(0, std), biases 0, norms 1), through the state dict."""
    with torch.no_grad():
        for name, t in tower.state_dict().items():
            if name.endswith("bias"):
                t.zero_()
            elif t.dim() == 1:
                t.fill_(1.0)
            else:
                # drawn where the generator lives (under `with torch.device("cuda")` too): the same numbers anywhere
                draw = torch.randn(t.shape, generator=generator, dtype=torch.float32,
                                   device=generator.device if generator is not None else None)
                t.copy_(draw.mul_(std))
    return tower


def build_vision_tower(config=None, *, seed: int = 0, dtype=torch.float32, device=None, **overrides) -> VisionTower:
    """Our tower of ``config`` (``Qwen2_5_VLVisionConfig``, a dict of its fields, or ``None``: 7B sizes) with seeded
    random weights (load real ones with :func:`megatron_apbv.models.checkpoint.load_vision_weights`).

    Weights are drawn on the CPU from ``seed`` (the same numbers on every device), built where torch's default
    device says (e.g. ``with torch.device("cuda")``) and moved to ``device``/``dtype``.
    """
    cfg = VisionTowerConfig.from_any(config, **overrides)
    tower = VisionTower(cfg)
    init_random_(tower, torch.Generator().manual_seed(seed))
    return tower.to(device=device, dtype=dtype).eval()


def vision_tower_flops(vision_config, grid_thw, *, out_hidden_size: Optional[int] = None) -> float:
    """Floating-point operations of one tower call on ``grid_thw`` (the work the bench and jobs divide by time).

    Counted as matmul work, 2 FLOP per multiply-add, unpadded sizes: the patch
    embedding ``2 N K C``; per block the linear layers ``2 N (4 C^2 + 3 C I)``
    (qkv, proj, gate, up, down) and attention ``4 C sum(len^2)`` over its segments
    (full-attention blocks: one per temporal group; the others: the windows);
    the merger ``2 (N / m^2) ((m^2 C)^2 + m^2 C out)``. Norms, RoPE and
    activations are not counted. Qwen2.5-VL-7B at 64 frames of 1428 x 2548:
    594,048 patches, 9.95e14.

    ``vision_config``: a tower's ``config`` (ours or transformers'), a dict, or
    the run config's ``vision`` section; the latter has no output width, so pass
    ``out_hidden_size=cfg.model.hidden_size`` with it. ``grid_thw``: ``[items, 3]``.
    """
    overrides = {} if out_hidden_size is None else {"out_hidden_size": int(out_hidden_size)}
    cfg = VisionTowerConfig.from_any(vision_config, **overrides)
    c, i, unit = cfg.hidden_size, cfg.intermediate_size, cfg.spatial_merge_size ** 2
    k = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    vw, m = cfg.window_tokens, cfg.spatial_merge_size
    n = full_sq = window_sq = 0
    for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist():
        n += t * h * w
        full_sq += t * (h * w) ** 2
        hm, wm = h // m, w // m
        rows = [vw] * (hm // vw) + ([hm % vw] if hm % vw else [])
        cols = [vw] * (wm // vw) + ([wm % vw] if wm % vw else [])
        window_sq += t * sum((r * q * unit) ** 2 for r in rows for q in cols)
    n_full = len(set(cfg.fullatt_block_indexes))
    blocks = cfg.depth * 2 * n * (4 * c * c + 3 * c * i)
    attention = 4 * c * (n_full * full_sq + (cfg.depth - n_full) * window_sq)
    merger = 2 * (n // unit) * ((unit * c) ** 2 + unit * c * cfg.out_hidden_size)
    return float(2 * n * k * c + blocks + attention + merger)
