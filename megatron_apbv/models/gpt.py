"""Model spec -> Megatron-core language model, and its forward on one rank's local sequence.

The model class is ``HybridModel`` where megatron-core has it (0.18.0 on; 0.19 deprecates ``GPTModel``),
else ``GPTModel`` (0.16, 0.17): the same layers, parameters and logits (docs/design.md §10).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel

try:  # megatron-core >= 0.18.0
    from megatron.core.models.hybrid.hybrid_model import HybridModel
except ImportError:  # 0.16, 0.17: GPTModel is the model class
    HybridModel = None
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_apbv.methods import get_method
from megatron_apbv.models.rope import PositionRotaryEmbedding
from megatron_apbv.models.weights import build_device, initialise_on_build, materialise, randomise
from megatron_apbv.runtime.config import RunConfig
from megatron_apbv.runtime.timing import sync

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(
    cfg: RunConfig, *, tensor_parallel_size: int, context_parallel_size: int, perform_initialization: bool = True
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` of a Qwen2/Llama-style decoder (RMSNorm, SwiGLU, GQA).

    ``perform_initialization=False`` skips Megatron's random initialisation (the
    weights come from a checkpoint or :func:`megatron_apbv.models.weights.randomise`).
    """
    m, dtype = cfg.model, DTYPES[cfg.dtype]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU initialisation draws the full weight from the seeded generator before
        # splitting it over tensor-parallel ranks: every rank agrees on the weights.
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        tensor_model_parallel_size=tensor_parallel_size,
        context_parallel_size=context_parallel_size,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_gpt_model(
    cfg: RunConfig, *, method: str, device: torch.device, layer_spec=None, core_params: Optional[dict] = None,
    weights_of: Optional[GPTModel] = None, timings: Optional[dict] = None,
) -> GPTModel:
    """The language model (HybridModel or GPTModel, see the module docstring) whose core attention is ``method``'s (``megatron_apbv.methods``: apbv, dense, ring, ulysses, ...).

    Weights depend only on ``cfg.seed`` and the shape (or ``model.checkpoint``), so
    every method built from one config holds the same weights. ``weights_of`` shares
    another model's parameters instead (built on the meta device, no copy): the
    benchmark runs each method on the very same tensors. Positions come from
    :class:`PositionRotaryEmbedding`, so Megatron's own position embedding is off.
    ``layer_spec`` replaces the method's layer spec (single-process, e.g. a
    reference attention in tests); ``core_params`` go to the core attention's constructor.

    With ``model.checkpoint`` the model is built on the meta device and its
    storage allocated on ``device`` straight away, then loaded: no random
    initialisation. Random weights are drawn on the GPU for CUDA runs and by
    Megatron on the CPU for CPU runs (see :mod:`megatron_apbv.models.weights`).
    ``timings``, when given, receives ``build_seconds`` and ``load_seconds``.
    """
    chosen = get_method(method)
    spec = layer_spec or chosen.layer_spec(**(core_params or {}))
    if chosen.single_process:
        tp, cp = 1, 1
    else:
        tp, cp = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
    torch.manual_seed(cfg.seed)
    initialise = weights_of is None and initialise_on_build(cfg.model.checkpoint, device)
    start = time.perf_counter()
    with build_device(initialise):
        common = dict(
            config=transformer_config(
                cfg, tensor_parallel_size=tp, context_parallel_size=cp, perform_initialization=initialise
            ),
            vocab_size=cfg.model.vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            position_embedding_type="none",
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            # Vocab-parallel logits, gathered by last_token_logits: Megatron's own gather allocates on CUDA.
            parallel_output=True,
        )
        if HybridModel is not None:
            from megatron_apbv.models.hybrid_stack import hybrid_layer_pattern, hybrid_stack_spec

            model = HybridModel(hybrid_stack_spec=hybrid_stack_spec(spec),
                                hybrid_layer_pattern=hybrid_layer_pattern(cfg.model.num_layers), **common)
        else:
            model = GPTModel(transformer_layer_spec=spec, **common)
    if weights_of is not None:
        model.load_state_dict(weights_of.state_dict(), assign=True)
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"weights_of left tensors without storage: {', '.join(left[:4])}")
        return model.eval()
    # Megatron's torch RMSNorm ignores params_dtype and keeps fp32 weights; next to bf16 activations
    # torch.rms_norm then falls back to an unfused path. Every parameter takes the run's dtype, as
    # Megatron's Float16Module does for half-precision models.
    dtype = DTYPES[cfg.dtype]
    if initialise:
        model = model.to(device=device, dtype=dtype)
    else:
        model = materialise(model.to(dtype=dtype), device)
        if not cfg.model.checkpoint:
            randomise(model, seed=cfg.seed, std=cfg.model.init_std, num_layers=cfg.model.num_layers)
    sync(device)
    built = time.perf_counter()
    if cfg.model.checkpoint:
        from megatron_apbv.models.checkpoint import load_hf_checkpoint

        tp_group = model.output_layer.tp_group
        load_hf_checkpoint(model, cfg.model.checkpoint, tp_rank=tp_group.rank() if tp_group else 0, tp_size=tp)
        sync(device)
    if timings is not None:
        timings.update(build_seconds=round(built - start, 6), load_seconds=round(time.perf_counter() - built, 6))
    return model.eval()


def build_rope(cfg: RunConfig, device: torch.device) -> PositionRotaryEmbedding:
    return PositionRotaryEmbedding(cfg.model.head_dim, cfg.model.rope_theta, cfg.model.mrope_section).to(device)


@torch.inference_mode()
def decoder_hidden(
    model: GPTModel, rope: PositionRotaryEmbedding, input_ids: torch.Tensor, position_ids: torch.Tensor,
    attention_mask=None, inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embed ``input_ids`` ``[b, s]`` and run the decoder at ``position_ids``; returns ``[s, b, h]``.

    ``inputs_embeds`` ``[s, b, h]``, when given, replaces the token embedding
    (e.g. text embeddings with video embeddings scattered in). The embedding and
    decoder are called directly (rather than ``GPTModel.forward``) to feed RoPE
    from global positions and to project only the tokens that need logits onto
    the vocabulary.
    """
    hidden = inputs_embeds if inputs_embeds is not None else model.embedding(input_ids=input_ids, position_ids=None)
    return model.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rope(position_ids))


@torch.inference_mode()
def vocab_logits(model: GPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, vocab]`` (fp32) of one token's final hidden state ``[1, b, h]``."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    logits = logits[0].float()
    tp_group = model.output_layer.tp_group
    if tp_group is not None and tp_group.size() > 1:
        shards = [torch.empty_like(logits) for _ in range(tp_group.size())]
        torch.distributed.all_gather(shards, logits.contiguous(), group=tp_group)
        logits = torch.cat(shards, dim=-1)
    return logits


def last_token_logits(
    model: GPTModel, rope: PositionRotaryEmbedding, input_ids: torch.Tensor, position_ids: torch.Tensor,
    attention_mask=None, inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[b, vocab]`` of the last token of ``input_ids`` ``[b, s]``."""
    hidden = decoder_hidden(model, rope, input_ids, position_ids, attention_mask, inputs_embeds)
    return vocab_logits(model, hidden[-1:])


def final_norm_name(model) -> str:
    """The final norm's module path: ``decoder.final_norm`` (HybridModel) or ``decoder.final_layernorm`` (GPTModel)."""
    return "decoder.final_norm" if hasattr(model.decoder, "final_norm") else "decoder.final_layernorm"
