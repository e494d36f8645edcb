"""Hugging Face safetensors checkpoints (Qwen2, Qwen2.5, Llama, Qwen2.5-VL's language model) -> our GPTModel.

Two steps: :func:`~megatron_apbv.models.hf_config.model_config_from_hf` turns a Hugging
Face ``config.json`` into the keys of our ``model:`` config section, and :func:`load_hf_checkpoint` copies
the ``*.safetensors`` weights into a GPTModel built from that config, fusing and
re-laying them out for Megatron and slicing them for this tensor-parallel rank.

Name mapping (``{i}`` is the layer; the Hugging Face names are given after their
prefix ``model.`` / ``model.language_model.`` / ``language_model.model.`` is
stripped)::

    embed_tokens.weight                          -> embedding.word_embeddings.weight     (rows: vocab-parallel)
    layers.{i}.input_layernorm.weight            -> decoder.layers.{i}.input_layernorm.weight
    layers.{i}.self_attn.{q,k,v}_proj.weight     -> decoder.layers.{i}.self_attention.linear_qkv.weight
    layers.{i}.self_attn.{q,k,v}_proj.bias       -> decoder.layers.{i}.self_attention.linear_qkv.bias
    layers.{i}.self_attn.o_proj.weight           -> decoder.layers.{i}.self_attention.linear_proj.weight (columns)
    layers.{i}.post_attention_layernorm.weight   -> decoder.layers.{i}.pre_mlp_layernorm.weight
    layers.{i}.mlp.{gate,up}_proj.weight         -> decoder.layers.{i}.mlp.linear_fc1.weight        ([gate; up])
    layers.{i}.mlp.down_proj.weight              -> decoder.layers.{i}.mlp.linear_fc2.weight        (columns)
    norm.weight                                  -> decoder.final_layernorm.weight (HybridModel: final_norm)
    lm_head.weight                               -> output_layer.weight (absent when embeddings are tied)

Megatron's fused QKV holds, for each KV group ``g``, the group's query heads,
then its key head, then its value head; a tensor-parallel rank holds a
contiguous run of whole groups. ``linear_fc1`` on a rank holds that rank's
slice of ``gate`` followed by its slice of ``up`` (Megatron's GLU splits the
local output in halves). Weights are read with ``safetensors.safe_open``
(memory-mapped, no pickle), and only the rows or columns a rank needs.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open

from megatron_apbv.models.hf_config import CheckpointError

# Longest first: "model.language_model." must win over "model.".
_LM_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_VISUAL_PREFIXES = ("visual.", "model.visual.")


def _open_safetensors(path: Path, stack: contextlib.ExitStack, device: torch.device):
    """``safe_open`` of one file onto ``device``, with a corrupt or truncated file reported by name."""
    try:
        return stack.enter_context(safe_open(str(path), framework="pt", device=str(device)))
    except Exception as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({type(err).__name__}: {err}): "
            "is it truncated or corrupt? download it again"
        ) from None


def _read_tensor(path: Path, read):
    """``read()`` of a tensor from ``path``: data cut short or unreadable becomes a CheckpointError naming the file."""
    try:
        return read()
    except Exception as err:
        raise CheckpointError(
            f"{str(path)!r}: a tensor cannot be read ({type(err).__name__}: {err}): is the file truncated?"
        ) from None


def _checkpoint_files(path: Path) -> list[Path]:
    index = None
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if path.is_file() and path.name.endswith(".json"):
        index, path = path, path.parent
    elif path.is_dir() and (path / "model.safetensors.index.json").is_file():
        index = path / "model.safetensors.index.json"
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{str(index)!r} is not valid JSON: {err}") from None
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' mapping tensor names to shard files")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name!r}, which does not exist in {path}")
        return files
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return [path / "model.safetensors"]
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
    raise CheckpointError(
        f"no safetensors checkpoint at {str(path)!r}: expected a .safetensors file, or a directory with "
        "model.safetensors or model.safetensors.index.json"
    )


def _canonical(name: str) -> tuple[Optional[str], str]:
    """(the language-model name without its prefix, the prefix); None for tensors this loader ignores."""
    if name.startswith(_VISUAL_PREFIXES) or name.endswith("rotary_emb.inv_freq"):
        return None, ""  # the vision tower is loaded elsewhere; RoPE frequencies come from rope_theta
    for prefix in _LM_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):], prefix
    return name, ""


class _Tensors:
    """Canonical name -> lazily read (sliced) tensor over the open safetensors files."""

    def __init__(self, files: list[Path], stack: contextlib.ExitStack, device: torch.device = torch.device("cpu")):
        self.device = device  # tensors are read straight onto the model's device
        self.where: dict[str, tuple] = {}  # canonical -> (handle, stored name)
        self.file_of: dict[int, Path] = {}  # id(handle) -> its file
        self.ignored: list[str] = []
        prefixes: Counter = Counter()
        for path in files:
            handle = _open_safetensors(path, stack, device)
            self.file_of[id(handle)] = path
            for name in handle.keys():
                canon, prefix = _canonical(name)
                if canon is None:
                    self.ignored.append(name)
                    continue
                if canon in self.where:
                    raise CheckpointError(
                        f"tensor {name!r} in {path.name} and {self.where[canon][1]!r} both map to {canon!r}: "
                        "the checkpoint holds the language model twice"
                    )
                self.where[canon] = (handle, name)
                if canon != "lm_head.weight":
                    prefixes[prefix] += 1
        # Missing tensors are named the way this checkpoint names its others.
        self.prefix = prefixes.most_common(1)[0][0] if prefixes else "model."

    def display(self, canon: str) -> str:
        """The checkpoint's name of ``canon`` (as it would be named when missing)."""
        if canon in self.where:
            return self.where[canon][1]
        return canon if canon == "lm_head.weight" else self.prefix + canon

    def shape(self, canon: str) -> tuple[int, ...]:
        handle, name = self.where[canon]
        return tuple(handle.get_slice(name).get_shape())

    def read(self, canon: str, dim: Optional[int] = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The whole tensor, or ``[start:stop]`` along ``dim`` (0 or 1) read from the memory map."""
        handle, name = self.where[canon]

        def read():
            if dim is None or (start == 0 and stop == self.shape(canon)[dim]):
                return handle.get_tensor(name).to(self.device)
            part = handle.get_slice(name)
            return (part[start:stop] if dim == 0 else part[:, start:stop]).to(self.device)

        return _read_tensor(self.file_of[id(handle)], read)

    def file(self, canon: str) -> Path:
        return self.file_of[id(self.where[canon][0])]


class _Shapes:
    """Stand-in for :class:`_Tensors` whose reads return meta tensors: a recipe's shard shape without I/O."""

    def __init__(self, tensors: _Tensors):
        self.tensors = tensors

    def read(self, canon: str, dim: Optional[int] = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        full = torch.empty(self.tensors.shape(canon), device="meta")
        if dim is None:
            return full
        return full[start:stop] if dim == 0 else full[:, start:stop]


@dataclass
class _Recipe:
    """How one model parameter is built: its sources, their full shapes, and the reader of this rank's shard."""

    sources: dict[str, tuple[int, ...]]
    build: Callable[[_Tensors], torch.Tensor]


@dataclass
class LoadReport:
    """What :func:`load_hf_checkpoint` did."""

    files: list[str]
    parameters: list[str]  # model parameters written
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors skipped (vision tower, inv_freq)


def _recipes(model, tp_rank: int, tp_size: int) -> dict[str, _Recipe]:
    cfg = model.config
    h, nh, hd, f = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_channels, cfg.ffn_hidden_size
    ng = cfg.num_query_groups or nh
    vocab = model.vocab_size
    for what, n in (("num_query_groups", ng), ("ffn_hidden_size", f), ("vocab_size", vocab)):
        if n % tp_size:
            raise CheckpointError(f"{what}={n} is not divisible by tp_size={tp_size}")
    qpg, ngl, fl, vl = nh // ng, ng // tp_size, f // tp_size, vocab // tp_size
    g0 = tp_rank * ngl  # this rank's first KV group

    def rows(src, n):  # row block ``tp_rank`` of n rows per rank (column-parallel / vocab-parallel)
        return lambda t: t.read(src, 0, tp_rank * n, (tp_rank + 1) * n)

    def cols(src, n):  # column block (row-parallel input dim)
        return lambda t: t.read(src, 1, tp_rank * n, (tp_rank + 1) * n)

    def whole(src):
        return lambda t: t.read(src)

    def qkv(pre, kind):
        def build(t):
            q = t.read(f"{pre}q_proj.{kind}", 0, g0 * qpg * hd, (g0 + ngl) * qpg * hd)
            k = t.read(f"{pre}k_proj.{kind}", 0, g0 * hd, (g0 + ngl) * hd)
            v = t.read(f"{pre}v_proj.{kind}", 0, g0 * hd, (g0 + ngl) * hd)
            rest = q.shape[1:]
            # [groups, (q heads | k | v) * hd, ...] -> Megatron's per-group interleaving.
            parts = [q.reshape(ngl, qpg * hd, *rest), k.reshape(ngl, hd, *rest), v.reshape(ngl, hd, *rest)]
            fused = torch.cat(parts, 1)
            return fused.reshape(ngl * (qpg + 2) * hd, *rest)

        return build

    def fc1(pre):
        def build(t):
            gate = t.read(f"{pre}gate_proj.weight", 0, tp_rank * fl, (tp_rank + 1) * fl)
            up = t.read(f"{pre}up_proj.weight", 0, tp_rank * fl, (tp_rank + 1) * fl)
            return torch.cat([gate, up], 0)

        return build

    out: dict[str, _Recipe] = {}
    for name, _ in model.named_parameters():
        if name == "embedding.word_embeddings.weight":
            out[name] = _Recipe({"embed_tokens.weight": (vocab, h)}, rows("embed_tokens.weight", vl))
        elif name == "output_layer.weight":
            out[name] = _Recipe({"lm_head.weight": (vocab, h)}, rows("lm_head.weight", vl))
        elif name in ("decoder.final_layernorm.weight", "decoder.final_norm.weight"):  # GPTModel, HybridModel
            out[name] = _Recipe({"norm.weight": (h,)}, whole("norm.weight"))
        elif m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name):
            i, rest = m.groups()
            pre = f"layers.{i}."
            a, mlp = f"{pre}self_attn.", f"{pre}mlp."
            # The local spec has separate norms; Transformer Engine's spec fuses them into the next linear.
            if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
                src = f"{pre}input_layernorm.weight"
                out[name] = _Recipe({src: (h,)}, whole(src))
            elif rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
                src = f"{pre}post_attention_layernorm.weight"
                out[name] = _Recipe({src: (h,)}, whole(src))
            elif rest == "self_attention.linear_qkv.weight":
                shapes = {f"{a}q_proj.weight": (nh * hd, h), f"{a}k_proj.weight": (ng * hd, h),
                          f"{a}v_proj.weight": (ng * hd, h)}
                out[name] = _Recipe(shapes, qkv(a, "weight"))
            elif rest == "self_attention.linear_qkv.bias":
                shapes = {f"{a}q_proj.bias": (nh * hd,), f"{a}k_proj.bias": (ng * hd,), f"{a}v_proj.bias": (ng * hd,)}
                out[name] = _Recipe(shapes, qkv(a, "bias"))
            elif rest == "self_attention.linear_proj.weight":
                out[name] = _Recipe({f"{a}o_proj.weight": (h, nh * hd)}, cols(f"{a}o_proj.weight", nh // tp_size * hd))
            elif rest == "mlp.linear_fc1.weight":
                out[name] = _Recipe({f"{mlp}gate_proj.weight": (f, h), f"{mlp}up_proj.weight": (f, h)}, fc1(mlp))
            elif rest == "mlp.linear_fc2.weight":
                out[name] = _Recipe({f"{mlp}down_proj.weight": (h, f)}, cols(f"{mlp}down_proj.weight", fl))
        if name not in out:
            raise CheckpointError(
                f"model parameter {name!r} has no counterpart in a Qwen2/Llama checkpoint: "
                "refusing to leave it uninitialised"
            )
    return out


def load_hf_checkpoint(model, path: str | Path, *, tp_rank: int = 0, tp_size: int = 1) -> LoadReport:
    """Copy a Hugging Face safetensors checkpoint into ``model`` (a GPTModel built by ``build_gpt_model``) in place.

    ``path`` is a ``.safetensors`` file, a sharded checkpoint's ``model.safetensors.index.json``,
    or a directory holding either. Q/K/V (and their biases) are fused into
    Megatron's per-group layout, gate/up into ``linear_fc1``; with ``tp_size > 1``
    only this rank's slice is read (column-parallel QKV by KV groups, fc1 by gate
    and up separately; row-parallel ``linear_proj`` / ``linear_fc2`` by input
    columns; embedding and output layer by vocabulary rows). Values are cast to
    each parameter's dtype. With tied embeddings the checkpoint needs no
    ``lm_head.weight`` (one equal to the embedding is accepted). Vision-tower
    tensors (``visual.*``) and ``rotary_emb.inv_freq`` are ignored.

    Raises :class:`CheckpointError` before writing anything when a tensor is
    missing, has the wrong shape or is unexpected, naming each tensor with the
    expected and found shapes; every model parameter is written exactly once.
    A file that is not safetensors (corrupt, truncated) and tensors holding NaN
    or Inf (found while copying, so the model is then partly written) raise it too,
    naming the file and the tensors.
    """
    cfg_tp = model.config.tensor_model_parallel_size
    if tp_size != cfg_tp or not 0 <= tp_rank < tp_size:
        raise CheckpointError(
            f"tp_rank={tp_rank}, tp_size={tp_size} do not fit the model, built with tensor_model_parallel_size={cfg_tp}"
        )
    files = _checkpoint_files(Path(path))
    recipes = _recipes(model, tp_rank, tp_size)
    params = dict(model.named_parameters())
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))

    with contextlib.ExitStack() as stack:
        tensors = _Tensors(files, stack, next(iter(params.values())).device)
        problems: list[str] = []
        expected: dict[str, tuple[int, ...]] = {}
        for recipe in recipes.values():
            expected.update(recipe.sources)
        for src, shape in expected.items():
            if src not in tensors.where:
                hint = " (the checkpoint ties embeddings? build the model with tie_embeddings=true)" \
                    if src == "lm_head.weight" else ""
                problems.append(
                    f"missing tensor {tensors.display(src)!r}: expected shape {list(shape)}, found none{hint}"
                )
            elif tensors.shape(src) != shape:
                problems.append(
                    f"tensor {tensors.where[src][1]!r}: expected shape {list(shape)}, found {list(tensors.shape(src))}"
                )
        tied_head = tied and "lm_head.weight" in tensors.where and "lm_head.weight" not in expected
        for src in sorted(set(tensors.where) - set(expected)):
            if src == "lm_head.weight" and tied_head:
                continue  # checked against the embedding below
            problems.append(
                f"unexpected tensor {tensors.where[src][1]!r} (shape {list(tensors.shape(src))}): the model has "
                "no parameter for it (wrong num_layers, or a bias the model lacks?)"
            )
        if problems:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit the model:\n  " + "\n  ".join(problems)
            )

        # Every shard's shape is checked before the first write, so a bad checkpoint leaves the model untouched.
        for name, recipe in recipes.items():
            shape = tuple(recipe.build(_Shapes(tensors)).shape)
            if shape != tuple(params[name].shape):
                raise CheckpointError(
                    f"model parameter {name!r}: expected shape {list(params[name].shape)} on tp rank {tp_rank}, "
                    f"found {list(shape)} from {', '.join(recipe.sources)}"
                )
        if tied_head:
            vl = model.vocab_size // tp_size
            head = tensors.read("lm_head.weight", 0, tp_rank * vl, (tp_rank + 1) * vl)
            embed = tensors.read("embed_tokens.weight", 0, tp_rank * vl, (tp_rank + 1) * vl)
            if tensors.shape("lm_head.weight") != tensors.shape("embed_tokens.weight") or not torch.equal(head, embed):
                raise CheckpointError(
                    "the model ties embeddings but the checkpoint's 'lm_head.weight' differs from "
                    "'embed_tokens.weight': build the model with tie_embeddings=false"
                )

        non_finite: list[str] = []
        with torch.no_grad():
            for name, recipe in recipes.items():
                # One parameter at a time: peak memory is one shard, not a second copy of the model.
                params[name].copy_(recipe.build(tensors))  # in place, cast to the parameter's dtype and device
                if not bool(torch.isfinite(params[name]).all()):  # a NaN weight gives NaN logits, silently
                    non_finite += [f"{tensors.display(src)!r} in {tensors.file(src).name}" for src in recipe.sources
                                   if not bool(torch.isfinite(tensors.read(src)).all())] or [repr(name)]
        if non_finite:
            shown = ", ".join(non_finite[:5]) + (f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else "")
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds non-finite values (NaN or Inf) in {shown}: the weights are broken"
            )
    return LoadReport(files=[str(f) for f in files], parameters=list(recipes), ignored=tensors.ignored)


# ----------------------------------------------------------------------------------------------
# the vision tower of Qwen2.5-VL
# ----------------------------------------------------------------------------------------------

_VISION_PREFIXES = ("model.visual.", "visual.")


def load_vision_weights(tower, path: str | Path) -> int:
    """Copy the checkpoint's ``visual.*`` tensors into a Qwen2.5-VL vision tower; returns how many.

    Every tower parameter must come from the checkpoint with the right shape, and
    every visual tensor must have a place in the tower: a :class:`CheckpointError`
    names the first tensors that do not.
    """
    state = tower.state_dict()
    found: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(Path(path)):
        with contextlib.ExitStack() as stack:
            f = _open_safetensors(file, stack, torch.device("cpu"))
            for name in f.keys():
                prefix = next((p for p in _VISION_PREFIXES if name.startswith(p)), None)
                if prefix is not None:
                    found[name[len(prefix):]] = _read_tensor(file, lambda f=f, name=name: f.get_tensor(name))
                    if not bool(torch.isfinite(found[name[len(prefix):]]).all()):
                        raise CheckpointError(f"{str(file)!r}: tensor {name!r} holds non-finite values (NaN or Inf)")
    missing = sorted(set(state) - set(found))
    unexpected = sorted(set(found) - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: vision tower mismatch: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in found.items():
        if tensor.shape != state[name].shape:
            raise CheckpointError(
                f"{path}: visual.{name}: expected shape {tuple(state[name].shape)}, found {tuple(tensor.shape)}"
            )
    with torch.no_grad():
        for name, tensor in found.items():
            state[name].copy_(tensor)
    return len(found)
