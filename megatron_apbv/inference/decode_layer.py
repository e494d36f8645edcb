"""The decoder layers of one decode step with the elementwise work fused (issue 28).

Megatron's ``TransformerLayer`` is the definition of a layer; at one token per
sequence its elementwise ops (norms, adds, bias, rotary halves, concatenation,
the cache scatter) are each far smaller than a kernel launch. :class:`FusedDecodeLayers`
runs the same layer computation from the same parameters with three fused
operations per layer instead:

* :func:`add_rms_norm_`: the residual add and the next RMSNorm in one pass;
* :func:`qkv_rope_append`: the QKV bias, RoPE (1-D or multimodal, from angles
  computed once per step) and the append of the new key / value to the cache;
* ``silu_mul`` (shared with the vision tower) between the MLP's projections.

The torch functions below define these operations (CPU, tests); CUDA tensors run
the Triton kernels of ``kernels/decode_step.py`` (:mod:`~megatron_apbv.apbv.kernels_dispatch`).
Equality with Megatron's layer is tested (tests/test_decode_layer.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_apbv.apbv.decode import DecodeStep, attend_cached
from megatron_apbv.apbv.kernels_dispatch import kernel_for
from megatron_apbv.models.vision_tower import silu_mul


def add_rms_norm_(residual: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """``residual += delta`` in place (when given); returns ``weight * rms_norm(residual)``, rounded as torch's."""
    kernel = kernel_for("decode_add_rms_norm", residual)
    if kernel is not None:
        return kernel(residual, delta, weight, eps)
    if delta is not None:
        residual.add_(delta)
    return F.rms_norm(residual, (residual.shape[-1],), weight, eps)


def qkv_rope_append(
    qkv: torch.Tensor, bias: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *, kv_heads: int,
) -> torch.Tensor:
    """Bias, RoPE and cache append of one new token per sequence; returns the rotated queries ``[1, b, hq, d]``.

    ``qkv`` ``[b, hkv * (g + 2) * d]`` is Megatron's fused projection (per KV group:
    its ``g`` query heads, its key, its value); ``cos`` / ``sin`` ``[b, d / 2]`` fp32
    are the rotation of each sequence's position (non-interleaved halves). The key
    and value of sequence ``i`` are written at row ``lengths[i]`` of the caches
    ``[capacity, b, hkv, d]``.
    """
    kernel = kernel_for("decode_qkv_rope_append", qkv)
    if kernel is not None:
        return kernel(qkv, bias, cos, sin, k_cache, v_cache, lengths, kv_heads=kv_heads)
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    x = qkv + bias if bias is not None else qkv
    x = x.view(b, kv_heads, -1, d)
    group = x.shape[2] - 2
    half = d // 2

    def rotate(t):  # t [b, heads, d]
        t = t.float()
        c, s = cos[:, None, :], sin[:, None, :]
        x1, x2 = t[..., :half], t[..., half:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)

    q = rotate(x[:, :, :group].reshape(b, kv_heads * group, d))
    rows = torch.arange(b, device=qkv.device)
    k_cache.index_put_((lengths.long(), rows), rotate(x[:, :, group]))
    v_cache.index_put_((lengths.long(), rows), x[:, :, group + 1])
    return q.unsqueeze(0)


def rotary_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[b, d / 2]`` fp32 of :meth:`PositionRotaryEmbedding.per_sequence`'s ``[1, b, 1, d]`` angles.

    Computed once per step in float64 (positions reach 10^6), shared by every layer.
    """
    half = angles.shape[-1] // 2
    a = angles[0, :, 0, :half]
    return torch.cos(a).float(), torch.sin(a).float()


class FusedDecodeLayers:
    """Megatron's decoder layers of ``model`` (tensor parallel size 1), run for one decode step with fused ops.

    The layers' own parameters are read (no copy); the cross-rank merge of the
    attention stays in :func:`~megatron_apbv.apbv.decode.attend_cached`.
    """

    def __init__(self, model):
        reason = self.unsupported(model)
        if reason:
            raise ValueError(f"FusedDecodeLayers: {reason}")
        self.decoder = model.decoder
        self.config = model.config
        self.final_norm = getattr(model.decoder, "final_norm", None) or model.decoder.final_layernorm

    @staticmethod
    def unsupported(model) -> Optional[str]:
        """Why the fused step cannot run ``model`` (None when it can): the layer shape it implements."""
        cfg = model.config
        if cfg.tensor_model_parallel_size != 1:
            return (f"tensor_model_parallel_size={cfg.tensor_model_parallel_size}; the fused decode step needs 1 "
                    "(set parallel.tensor_parallel_size=1)")
        if cfg.normalization != "RMSNorm" or not cfg.gated_linear_unit or cfg.add_bias_linear:
            return "it implements RMSNorm + SwiGLU layers without linear biases (Qwen2 / Llama)"
        if getattr(cfg, "qk_layernorm", False):
            return "qk layernorm is not implemented"
        return None

    def forward(self, hidden: torch.Tensor, step: DecodeStep, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[1, b, h]`` (the embedded tokens, used as the residual stream in place) -> final-normed ``[1, b, h]``."""
        cfg = self.config
        hkv = cfg.num_query_groups
        layers = list(self.decoder.layers)
        residual = hidden
        eps = cfg.layernorm_epsilon  # every norm of the layer spec is built with it
        x = add_rms_norm_(residual, None, layers[0].input_layernorm.weight, eps)
        b = hidden.shape[1]
        for i, layer in enumerate(layers):
            attn = layer.self_attention
            core = attn.core_attention
            k_cache, v_cache = step.cache.layers[core.layer_number]
            qkv = F.linear(x, attn.linear_qkv.weight).view(b, -1)
            q = qkv_rope_append(qkv, attn.linear_qkv.bias, cos, sin, k_cache, v_cache, step.cache.lengths,
                                kv_heads=hkv)
            out = attend_cached(q, step, core.layer_number, softmax_scale=core.softmax_scale, group=core.cp_group)
            x = add_rms_norm_(residual, F.linear(out.reshape(1, b, -1), attn.linear_proj.weight),
                              layer.pre_mlp_layernorm.weight, eps)
            mlp = layer.mlp
            act = silu_mul(F.linear(x, mlp.linear_fc1.weight).view(b, -1))
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.final_norm
            x = add_rms_norm_(residual, F.linear(act, mlp.linear_fc2.weight).view(1, b, -1), nxt.weight, eps)
        return x
