"""The model a process serves and the code of every stage of a request: one pipeline for every command.

``apbv run``/``apbv generate`` build an :class:`Engine` for their single prompt;
``apbv infer`` builds one from the job config and serves every request with it;
``apbv bench --level e2e`` times the same stages on one GPU. Each stage is one
method here, so the job, the single-prompt commands and the benchmark run the
same code (``tests/test_bench_e2e.py`` checks it):

1. ``video_decode`` (:meth:`Engine.read_prompt`, CPU): the prompt's ids and
   positions, and this rank's share of the video's frames, decoded and resized;
2. ``vision`` (:meth:`Engine.embed`): the vision tower on the rank's temporal
   groups, the embeddings all-gathered over the APB-V group and scattered into
   the text embeddings;
3. ``prefill`` (:meth:`Engine.prefill`): the decoder over the rank's tokens and
   the last token's logits;
4. ``decode`` (:meth:`Engine.decode_runner`): the static-shape batched decode
   step (:mod:`.decode_step`, CUDA-graph capable).

Nothing in it depends on a prompt's length: the layout, budgets and KV cache are
made per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from megatron_apbv.models.embeddings import build_vision_tower_for, input_embeddings
from megatron_apbv.models.gpt import build_gpt_model, build_rope, last_token_logits
from megatron_apbv.models.inputs import Prompt, build_prompt
from megatron_apbv.runtime.config import RunConfig

STAGES = ("video_decode", "vision", "prefill", "decode")


def frame_share(cfg: RunConfig, rank: int, world: int) -> Optional[tuple[int, int]]:
    """``share`` for :meth:`Engine.read_prompt`: a video prompt's rank reads only its temporal groups."""
    return (rank, world) if cfg.input.kind == "video" else None


@dataclass
class Engine:
    model: torch.nn.Module  # the APB-V GPT model (weights from model.checkpoint, else seeded from cfg.seed)
    rope: torch.nn.Module
    tower: Optional[torch.nn.Module]  # the vision tower, when some prompt has real video frames
    device: torch.device
    build_timings: dict = field(default_factory=dict)  # build_seconds, load_seconds of the model

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, *, vision: Optional[bool] = None) -> "Engine":
        """Build from the job config; ``vision`` (default: ``input.kind == video``) also builds the tower."""
        vision = cfg.input.kind == "video" if vision is None else vision
        timings: dict = {}
        model = build_gpt_model(cfg, method="apbv", device=device, timings=timings)
        tower = build_vision_tower_for(cfg, device) if vision else None
        return cls(model, build_rope(cfg, device), tower, device, timings)

    @classmethod
    def of(cls, run) -> "Engine":
        """The engine an earlier :class:`~megatron_apbv.inference.prefill.Prefill` ran on (same model, no rebuild)."""
        return cls(run.model, run.rope, run.tower, run.logits.device)

    def with_model(self, model: torch.nn.Module) -> "Engine":
        """The same tower and RoPE with another decoder (the bench's dense method on the same weights)."""
        return replace(self, model=model)

    # The stages ---------------------------------------------------------------------------------

    @staticmethod
    def read_prompt(cfg: RunConfig, share: Optional[tuple[int, int]] = None,
                    frames: Optional[torch.Tensor] = None) -> Prompt:
        """Stage ``video_decode`` (host only, thread-safe): ``build_prompt`` with this rank's ``share`` of frames.

        Raises ``OSError``/``ValueError`` for the request's own failures (a missing
        or undecodable video, a question the tokenizer cannot render).
        """
        return build_prompt(cfg, share=share, frames=frames)

    def embed(self, prompt: Prompt, global_indices: torch.Tensor, group=None) -> Optional[torch.Tensor]:
        """Stage ``vision``: ``[s, b, h]`` input embeddings of the rank's tokens (None for a text-only prompt)."""
        if prompt.frames is not None and self.tower is None:
            from megatron_apbv.runtime.config import ConfigError

            raise ConfigError("the prompt has video frames but the engine was built without a vision tower")
        with torch.inference_mode():
            return input_embeddings(self.model, self.tower, prompt, global_indices, self.device, group=group)

    def prefill(self, ids: torch.Tensor, pos: torch.Tensor, mask, embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """Stage ``prefill``: the decoder over the rank's tokens (``mask``: the method's ``attention_mask``; for
        APB-V an ``APBVInferenceContext`` when the request's KV cache is filled), then the prompt's last token's
        logits ``[b, vocab]``."""
        return last_token_logits(self.model, self.rope, ids, pos, mask, inputs_embeds=embeds)

    def decode_runner(self, cache, positions: torch.Tensor, *, cuda_graph: bool, fused: Optional[bool] = None):
        """Stage ``decode``: the static-shape step over ``cache`` (a ``DecodeCache``), eager or graphed."""
        from megatron_apbv.inference.decode_step import DecodeRunner

        return DecodeRunner(self.model, self.rope, cache, positions, cuda_graph=cuda_graph, fused=fused)
