"""A Hugging Face checkpoint's ``config.json`` -> the keys of our ``model:`` and ``vision:`` sections; its
``generation_config.json`` -> the defaults of ``generate:``.

Standard library only: the config is resolved and validated (``models/resolve.py``) before torch or
safetensors is imported, so a wrong key fails at once even with ``model.checkpoint`` set.
The weights themselves are read by :mod:`megatron_apbv.models.checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# architecture name -> family; model_type is the fallback when "architectures" is absent.
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "qwen2_5_vl": "qwen2_5_vl"}

# Hugging Face's defaults for keys a config.json may leave out.
_DEFAULTS = {
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "qwen2_5_vl": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5},
}

class CheckpointError(ValueError):
    """The checkpoint does not fit the model: the message names each tensor, expected and found shapes."""



def read_hf_config(path: str | Path) -> dict:
    """The ``config.json`` of a Hugging Face checkpoint directory (or the file itself) as a dict."""
    path = Path(path)
    if path.is_file() and path.suffix != ".json":
        raise CheckpointError(
            f"{str(path)!r} is a file, not a checkpoint directory: point model.checkpoint at the folder that "
            f"holds config.json and the safetensors files ({str(path.parent)!r})"
        )
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist: a Hugging Face checkpoint directory holds config.json")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{str(path)!r} holds a JSON {type(config).__name__}, not an object of settings: is it a config.json?"
        )
    return config


def _family(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if not archs and hf_config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf_config["model_type"]]
    raise ValueError(
        f"architectures={archs!r} (model_type={hf_config.get('model_type')!r}) is not supported; "
        f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _text_settings(hf_config: dict) -> dict:
    """The language model's settings: top level, overridden by ``text_config`` where present."""
    text = hf_config.get("text_config")
    if not isinstance(text, dict):
        return dict(hf_config)
    merged = {k: v for k, v in hf_config.items() if k not in ("text_config", "vision_config")}
    merged.update(text)
    # The lm_head belongs to the outer model, so the outer flag rules; older saves kept it in text_config
    # (transformers forwards a True from there, and so do we).
    merged["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings")) or bool(
        text.get("tie_word_embeddings")
    )
    return merged


def model_config_from_hf(hf_config: dict) -> dict:
    """Our ``model:`` section (a dict of :class:`~megatron_apbv.runtime.config.ModelConfig` keys) for a HF ``config.json``.

    Supports Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``), Llama (``LlamaForCausalLM``) and
    the language model of Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, whose
    text settings may sit at the top level or under ``text_config``). Features our
    model cannot reproduce (sliding-window attention, RoPE scaling other than
    Qwen2.5-VL's mrope, biases outside Q/K/V, activations other than SiLU) raise
    ``ValueError`` rather than load into a model that computes something else.
    ``mrope_section`` is only present for Qwen2.5-VL.
    """
    family = _family(hf_config)
    t = _text_settings(hf_config)
    defaults = _DEFAULTS[family]

    def need(key):
        if t.get(key) is None:
            raise ValueError(f"config.json has no {key!r}, which a {family} config must set")
        return t[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    if t.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={t['hidden_act']!r} is not supported: the model's MLP is SwiGLU (silu)")
    if t.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported: the model attends over the whole prompt")
    other_layers = sorted({lt for lt in t.get("layer_types") or [] if lt != "full_attention"})
    if other_layers:
        raise ValueError(f"layer_types {other_layers} are not supported: only full_attention layers")
    if family == "llama" and t.get("attention_bias"):
        # attention_bias also puts a bias on o_proj, which our linear_proj (add_bias_linear=False) lacks.
        raise ValueError("attention_bias=true is not supported for Llama: linear_proj has no bias")
    if t.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported: the MLP's linear layers have no bias")

    # transformers < 5 writes rope_theta / rope_scaling, 5.x writes rope_parameters.
    rope = t.get("rope_scaling") or t.get("rope_parameters") or {}
    kinds = {rope.get("rope_type"), rope.get("type")} - {None, "default", "mrope"}
    if kinds:
        raise ValueError(
            f"RoPE scaling {sorted(kinds)} is not supported: the model uses plain RoPE (or Qwen2.5-VL mrope)"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported")
    theta = t.get("rope_theta", rope.get("rope_theta", defaults["rope_theta"]))

    out = {
        "num_layers": int(need("num_hidden_layers")),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": int(t.get("num_key_value_heads") or heads),
        "kv_channels": int(t.get("head_dim") or hidden // heads),
        "ffn_hidden_size": int(need("intermediate_size")),
        "vocab_size": int(need("vocab_size")),
        "rope_theta": float(theta),
        "norm_epsilon": float(t.get("rms_norm_eps", defaults["rms_norm_eps"])),
        "qkv_bias": family != "llama",  # Qwen2 always has Q/K/V biases; Llama has none (attention_bias rejected)
        "tie_embeddings": bool(t.get("tie_word_embeddings", False)),
    }
    if family == "qwen2_5_vl":
        section = rope.get("mrope_section")
        if not section:
            raise ValueError("Qwen2.5-VL config has no rope_scaling.mrope_section (3-D RoPE sections)")
        out["mrope_section"] = [int(s) for s in section]
    return out


# ----------------------------------------------------------------------------------------------
# safetensors files
# ----------------------------------------------------------------------------------------------


_VISION_KEYS = (
    "depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "spatial_merge_size",
    "temporal_patch_size", "window_size", "fullatt_block_indexes", "tokens_per_second",
)

def vision_config_from_hf(hf_config: dict) -> Optional[dict]:
    """Our ``vision:`` section for a Qwen2.5-VL ``config.json`` (``None`` when it has no vision tower)."""
    vision = hf_config.get("vision_config")
    if not isinstance(vision, dict):
        return None
    return {key: vision[key] for key in _VISION_KEYS if key in vision}


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def checkpoint_sampling_defaults(folder: str) -> dict:
    """The sampling keys of ``folder/generation_config.json`` (empty without the file).

    As in transformers, without ``do_sample: true`` the checkpoint decodes greedily:
    its temperature is then 0.
    """
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix it or set the generate keys explicitly") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    out = {k: data[k] for k in SAMPLING_KEYS if data.get(k) is not None}
    if not data.get("do_sample", False):
        out["temperature"] = 0.0
    return out
