"""Patch-embedding vision front end and the needle model (Megatron GPT + front end), checkpoints.

Frames ``uint8 [b, F, H, W, 3]`` are cut into ``patch x patch`` patches (row-major
inside a frame, frames in time order: one token per patch), each patch is flattened,
centred, projected by one linear layer to the hidden size, and a learned
embedding of the patch's place in the frame is added. These embeddings replace
the token embeddings at the video placeholder positions of the prompt; the
decoder (Megatron's GPT layers) then runs on ``[s, b, h]`` as usual, so the same
weights run dense, APB-V, APB-like and Star attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_apbv.eval.needle import NeedleGeometry


class PatchFrontEnd(torch.nn.Module):
    def __init__(self, patch: int, grid: tuple[int, int], hidden: int, channels: int = 3, probe_classes: int = 27):
        super().__init__()
        self.patch, self.grid = patch, tuple(grid)
        self.proj = torch.nn.Linear(patch * patch * channels, hidden)
        # Training-only probe on the decoder's final hidden states (3 per-token targets x 9 classes, see
        # needle.NeedleExample.targets); saved with the weights, never used to answer.
        self.probe = torch.nn.Linear(hidden, probe_classes)
        self.place = torch.nn.Parameter(torch.zeros(grid[0] * grid[1], hidden))
        torch.nn.init.normal_(self.proj.weight, std=0.02)
        torch.nn.init.normal_(self.place, std=0.02)

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [b, F, H, W, C]`` -> ``[b, F * gh * gw, p * p * C]`` in [-0.5, 0.5]."""
        b, f, h, w, c = frames.shape
        p, (gh, gw) = self.patch, self.grid
        x = frames.to(self.proj.weight.dtype) / 255.0 - 0.5
        x = x.view(b, f, gh, p, gw, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f * gh * gw, p * p * c)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Video embeddings ``[b, F * gh * gw, hidden]``."""
        b, f = frames.shape[:2]
        x = self.proj(self.patchify(frames))
        return (x.view(b, f, -1, x.shape[-1]) + self.place).reshape(b, -1, x.shape[-1])


def build_frontend(geo: NeedleGeometry, hidden: int, device) -> PatchFrontEnd:
    return PatchFrontEnd(geo.patch, geo.grid, hidden).to(device)


def prompt_embeddings(model, frontend: PatchFrontEnd, geo: NeedleGeometry, input_ids: torch.Tensor,
                      frames: torch.Tensor) -> torch.Tensor:
    """Input embeddings ``[N, b, h]``: word embeddings, video positions replaced by the front end."""
    words = model.embedding(input_ids=input_ids, position_ids=None)  # [N, b, h]
    video = frontend(frames).transpose(0, 1).to(words.dtype)  # [F * tpf, b, h]
    start, stop = geo.video_start, geo.video_start + geo.video_tokens
    return torch.cat([words[:start], video, words[stop:]])


def decoder_logits(model, rope, embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                   rows: slice | None = None, return_hidden: bool = False):
    """Logits ``[rows, b, vocab]`` of the decoder over ``embeds`` (with autograd; for training).

    With ``return_hidden`` also the final hidden states ``[rows, b, h]``.
    """
    hidden = model.decoder(hidden_states=embeds, attention_mask=attention_mask, rotary_pos_emb=rope(position_ids))
    if rows is not None:
        hidden = hidden[rows]
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return (logits, hidden) if return_hidden else logits


# --------------------------------------------------------------------------- checkpoints


def state_tensors(model, frontend: PatchFrontEnd) -> dict[str, torch.Tensor]:
    """Every parameter and tensor buffer of the model (``gpt.``) and the front end (``frontend.``)."""
    out = {}
    for prefix, module in (("gpt.", model), ("frontend.", frontend)):
        for name, value in module.state_dict().items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value.detach().float().cpu()
    return out


def save_checkpoint(path, model, frontend: PatchFrontEnd, metadata: dict) -> None:
    try:
        from megatron_apbv.runtime.atomic import atomic_save_safetensors
    except ImportError:  # pragma: no cover - older trees
        atomic_save_safetensors = None
    tensors = state_tensors(model, frontend)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if atomic_save_safetensors is not None:
        atomic_save_safetensors(tensors, path, metadata=meta)
    else:  # pragma: no cover
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def load_checkpoint(path, model, frontend: PatchFrontEnd) -> dict:
    """Load weights into ``model`` and ``frontend`` (cast to their dtypes); returns the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"needle checkpoint {str(path)!r} does not exist (train it: see checkpoints/needle/README.md)")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    for prefix, module in (("gpt.", model), ("frontend.", frontend)):
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(own, strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{path}: {prefix[:-1]} weights do not match the config: missing {missing}, "
                             f"unexpected {unexpected}")
    return metadata

