"""The main job: APB-V prefill of the configured model and input across the launched ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_apbv.apbv.attention import APBVMask
from megatron_apbv.apbv.attention_routes import describe_layer
from megatron_apbv.apbv.decode import DistributedKVCache
from megatron_apbv.apbv.inference_context import APBVInferenceContext
from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.inference.divergence import kl_from_dense
from megatron_apbv.inference.engine import Engine, frame_share
from megatron_apbv.inference.stage_clock import StageClock
from megatron_apbv.methods import REFERENCE
from megatron_apbv.models.embeddings import input_embeddings
from megatron_apbv.models.gpt import DTYPES, build_gpt_model, last_token_logits
from megatron_apbv.models.inputs import Prompt, build_prompt
from megatron_apbv.runtime.config import ConfigError, RunConfig
from megatron_apbv.runtime.distributed import LaunchEnv
from megatron_apbv.runtime.groups import context_parallel_group, context_parallel_rank
from megatron_apbv.runtime.numerics import NonFiniteError
from megatron_apbv.runtime.timing import timed


@dataclass
class Prefill:
    """One rank's prefill: the last query token's logits and what produced them."""

    logits: torch.Tensor  # [b, vocab], identical on every rank
    seconds: float
    model: torch.nn.Module
    rope: torch.nn.Module
    prompt: Prompt  # the whole prompt (every rank builds it from the seed)
    seq: SequenceLayout
    cache: Optional[DistributedKVCache] = None
    tower: Optional[torch.nn.Module] = None  # the vision tower (input.kind: video)
    video: Optional[dict] = None  # the sampled video and each rank's decode seconds (input.kind: video)
    build_timings: dict = field(default_factory=dict)  # build_seconds, load_seconds of the model (when built here)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # video_decode, vision, prefill (one run)


def apbv_prefill(
    cfg: RunConfig,
    device: torch.device,
    *,
    max_new_tokens: int = 0,
    repeat: int = 0,
    engine: Optional[Engine] = None,
    prompt: Optional[Prompt] = None,
    barrier: bool = True,
    clock: Optional[StageClock] = None,
) -> Prefill:
    """Run this rank's ``[A | blocks | Q]`` through the APB-V model (built here unless ``engine`` is given).

    With ``max_new_tokens > 0`` each layer keeps the rank's own K/V in
    ``Prefill.cache`` for distributed decoding. ``repeat`` > 0 times the median
    of that many prefills after a warm-up one. ``engine``: the model, RoPE and
    vision tower built once (``apbv infer``, or several requests decoded together).
    ``prompt`` is ``build_prompt(cfg)`` when the caller made it already;
    ``barrier=False`` times without the world barriers (``apbv infer``: replicas
    run different requests). ``clock`` times the stages (default: each alone, device synchronised).
    """
    seq = SequenceLayout.from_config(cfg)
    layout = seq.rank(context_parallel_rank())
    group = context_parallel_group()
    stages: dict[str, float] = {}
    clock = clock or StageClock(device, sync_first=True)
    if prompt is None:
        # each rank decodes only the frames of the temporal groups its vision tower share encodes
        with clock.stage("video_decode", stages, gpu=False):
            prompt = Engine.read_prompt(cfg, share=frame_share(cfg, layout.rank, dist.get_world_size(group)))
    video = _video_record(cfg, prompt, device, group)
    engine = engine or Engine.build(cfg, device, vision=prompt.frames is not None)
    local = prompt.local(layout.global_indices)
    cache = DistributedKVCache(layout, max_new_tokens) if max_new_tokens else None
    mask = APBVMask.from_config(cfg, layout)
    # the request's cache travels in its own context beside the settings, never inside the mask
    attention_mask = APBVInferenceContext.prefill(mask, cache) if cache is not None else mask
    ids, pos = local.input_ids.to(device), local.position_ids.to(device)

    def forward():
        with clock.stage("vision", stages):
            embeds = engine.embed(prompt, layout.global_indices, group)
        with clock.stage("prefill", stages):
            return engine.prefill(ids, pos, attention_mask, embeds)

    logits, seconds = timed(forward, device, repeat, barrier=barrier)
    runs = 1 + repeat  # the stage sums cover every run: report one run's share
    stages = {k: v / runs if k != "video_decode" else v for k, v in stages.items()}
    return Prefill(logits, seconds, engine.model, engine.rope, prompt, seq, cache, engine.tower, video,
                   engine.build_timings, stages)


def _video_record(cfg: RunConfig, prompt: Prompt, device: torch.device, group) -> Optional[dict]:
    """``FramePlan.record`` plus every rank's video-decode seconds (all-gathered over the APB-V group)."""
    if prompt.plan is None:
        return None
    mine = torch.tensor([prompt.decode_seconds], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return {
        **prompt.plan.record(cfg.vision.tokens_per_second),
        "decoder": "pyav" if cfg.input.video_path else "synthetic",
        "decode_seconds_per_rank": [round(float(t), 6) for t in every],
    }


def run_prefill(
    cfg: RunConfig, env: LaunchEnv, device: torch.device, *, compare: str | None = None, repeat: int = 0
) -> dict:
    """Prefill on every rank; returns the result record (complete on rank 0).

    ``compare="dense"`` also runs the same weights and prompt densely on one
    process (rank 0) and adds ``max_abs_logit_diff``, ``top1_agree`` and ``kl``.
    """
    if compare not in (None, REFERENCE):
        raise ConfigError(f"--compare {compare!r}: only {REFERENCE!r} is available")
    if compare is not None and cfg.parallel.tensor_parallel_size != 1:
        raise ConfigError("--compare dense needs parallel.tensor_parallel_size=1 (the dense run holds all weights)")
    run = apbv_prefill(cfg, device, repeat=repeat)
    logits, seq = run.logits, run.seq

    # The query rows are exact on every rank, so every rank must hold the same logits.
    everyone = [torch.empty_like(logits) for _ in range(env.world_size)]
    dist.all_gather(everyone, logits)
    # Every rank now holds every rank's logits: the same finiteness verdict everywhere, no extra collective.
    bad = [rank for rank, t in enumerate(everyone) if not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(
            f"non-finite values (NaN or Inf) in the logits at the end of prefill on rank(s) "
            f"{', '.join(map(str, bad))}: the weights or the inputs overflow (check model.checkpoint, "
            "model.init_std and dtype)"
        )
    spread = max((t - logits).abs().max().item() for t in everyone)

    record = {
        "world_size": env.world_size,
        "context_parallel_size": cfg.parallel.context_parallel_size,
        "tensor_parallel_size": cfg.parallel.tensor_parallel_size,
        "variant": cfg.apbv.variant,
        "prompt_tokens": seq.prompt_len,
        "anchor_len": seq.anchor_len,
        "passing_len": max(cfg.passing_lens()),
        "passing_lens": list(cfg.passing_lens()),
        "query_len": seq.query_len,
        "block_lens": [len(s) for s in seq.block_spans],
        "dtype": cfg.dtype,
        "device": device.type,
        "prefill_seconds": round(run.seconds, 6),
        **run.build_timings,
        "next_token_id": logits.argmax(-1).tolist() if logits.shape[0] > 1 else int(logits[0].argmax()),
        "rank_logit_spread": spread,
        "attention_backend": describe_layer(
            seq.rank(context_parallel_rank()), cfg.model.head_dim, DTYPES[cfg.dtype], device
        ),
    }
    if run.video is not None:
        record["video"] = run.video
    if compare is not None and env.rank == 0:
        record.update(_compare_dense(cfg, run, device, repeat))
    return record


def add_arguments(parser) -> None:
    parser.add_argument("--compare", choices=[REFERENCE], default=None, help="also run densely on one process")
    parser.add_argument(
        "--repeat", type=int, default=0, metavar="N",
        help="report the median of N prefills after a warm-up one (default 0: a single prefill)",
    )


def command(args, cfg: RunConfig, env: LaunchEnv, device: torch.device) -> dict:
    """``apbv run``."""
    return run_prefill(cfg, env, device, compare=args.compare, repeat=args.repeat)


def _compare_dense(cfg: RunConfig, run: Prefill, device: torch.device, repeat: int) -> dict:
    dense = build_gpt_model(cfg, method=REFERENCE, device=device)
    dense.load_state_dict(run.model.state_dict())  # same weights by construction; loading makes it certain
    logits, prompt = run.logits, run.prompt
    if prompt.shared:  # rank 0 alone encodes every frame
        prompt = build_prompt(cfg)

    def forward():
        with torch.inference_mode():
            embeds = input_embeddings(dense, run.tower, prompt, torch.arange(prompt.input_ids.shape[1]), device)
        return last_token_logits(
            dense, run.rope, prompt.input_ids.to(device), prompt.position_ids.to(device), inputs_embeds=embeds
        )

    ref, seconds = timed(forward, device, repeat, barrier=False)  # rank 0 alone
    finite = bool(torch.isfinite(ref).all()) and bool(torch.isfinite(logits).all())  # NaN's argmax is 0 on both
    return {
        "dense_seconds": round(seconds, 6),
        "max_abs_logit_diff": (logits - ref).abs().max().item(),
        "top1_agree": finite and bool((logits.argmax(-1) == ref.argmax(-1)).all()),
        "kl": kl_from_dense(ref, logits).mean().item(),
    }
