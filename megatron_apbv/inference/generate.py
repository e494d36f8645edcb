"""Generation: APB-V prefill, then decoding over the distributed KV cache (docs/design.md §5)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_apbv.apbv.decode import DecodeCache
from megatron_apbv.inference.engine import Engine
from megatron_apbv.inference.prefill import Prefill, apbv_prefill
from megatron_apbv.inference.sampling import Sampler
from megatron_apbv.inference.stage_clock import StageClock
from megatron_apbv.models.chat_prompt import has_tokenizer, load_tokenizer
from megatron_apbv.models.hf_config import read_hf_config
from megatron_apbv.models.inputs import Prompt
from megatron_apbv.runtime.config import ConfigError, GenerateConfig, RunConfig
from megatron_apbv.runtime.groups import context_parallel_group
from megatron_apbv.runtime.host_collectives import any_rank
from megatron_apbv.runtime.numerics import FiniteTracker, check_finite
from megatron_apbv.runtime.timing import sync


# Finished rows are only detected on the host every this many steps (one sync each), not per token.
STOP_CHECK_EVERY = 8


def decode_mode_for(settings: GenerateConfig, device: torch.device) -> bool:
    """Whether decoding replays a CUDA graph: ``generate.cuda_graphs`` (``auto`` = on for CUDA devices)."""
    if settings.cuda_graphs == "auto":
        return device.type == "cuda"
    if settings.cuda_graphs and device.type != "cuda":
        raise ConfigError(
            f"generate.cuda_graphs=true needs a CUDA device, the run is on {device.type}: set generate.cuda_graphs=auto"
        )
    return bool(settings.cuda_graphs)


def apbv_generate(
    cfg: RunConfig,
    device: torch.device,
    *,
    engine: Optional[Engine] = None,
    prompt: Optional[Prompt] = None,
    barrier: bool = True,
    clock: Optional[StageClock] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> dict:
    """Prefill with APB-V, then decode ``cfg.generate.max_new_tokens`` tokens; returns ids and timings.

    ``input.batch_size`` sequences are prefilled together and decoded together
    (:func:`generate_batch`). ``engine``, ``prompt`` and ``barrier`` go to
    :func:`apbv_prefill` (``apbv infer`` passes its engine and each request's prompt);
    ``clock`` times every stage (default: a :class:`StageClock` synchronised around each stage).
    ``should_stop`` (``apbv infer``'s SIGTERM flag) may end the decoding between tokens
    (``"stopped_by_signal": true`` in the result).
    """
    settings = cfg.generate
    cfg.check_generation_fits()  # a ConfigError on every rank, before the prefill's first collective
    stop_ids = stop_token_ids(cfg)  # a broken generation_config.json fails here, on every rank, before collectives
    graphs = decode_mode_for(settings, device)
    clock = clock or StageClock(device, sync_first=True)
    run = apbv_prefill(
        cfg, device, max_new_tokens=settings.max_new_tokens, engine=engine, prompt=prompt, barrier=barrier,
        clock=clock,
    )
    with clock.stage("decode", {}):  # the GPU's busy time; the record's decode seconds are generate_batch's
        result = generate_batch([run], settings, seed=cfg.seed, stop_ids=stop_ids, cuda_graphs=graphs,
                                should_stop=should_stop)
    return {
        "prompt_tokens": run.seq.prompt_len,
        "generated_ids": result.generated_ids,
        "prefill_seconds": round(run.seconds, 6),
        **run.build_timings,
        **result.record(),
        "cache_tokens_on_rank0": run.cache.num_tokens,
        "stop_ids": stop_ids,
        "stopped_by_signal": result.stopped_by_signal,
        **({"video": run.video} if run.video is not None else {}),
        "stage_seconds": {**run.stage_seconds, "decode": result.decode_seconds},
    }


@dataclass
class BatchGeneration:
    """What :func:`generate_batch` produced: one id list per sequence, in the prefills' order."""

    generated_ids: list[list[int]]
    decode_seconds: float
    decode_tokens: int  # tokens emitted by decode steps (the first token of each comes from its prefill)
    decode_mode: str  # "cuda_graph" or "eager"
    capture_seconds: float
    stopped_by_signal: bool = False  # should_stop() ended the decoding early
    layers_path: str = "megatron"  # DecodeRunner.layers_path: "fused" (FusedDecodeLayers) or "megatron"

    def record(self) -> dict:
        return {
            "decode_seconds": round(self.decode_seconds, 6),
            "decode_tokens_per_second": (
                round(self.decode_tokens / self.decode_seconds, 3) if self.decode_tokens else None
            ),
            "decode_mode": self.decode_mode,
            "graph_capture_seconds": round(self.capture_seconds, 6),
        }


@torch.inference_mode()
def generate_batch(
    prefills: list[Prefill], settings: GenerateConfig, *, seed: int, stop_ids: list[int], cuda_graphs: bool,
    should_stop: Optional[Callable[[], bool]] = None, fused_layers: Optional[bool] = None,
) -> BatchGeneration:
    """Decode every sequence of ``prefills`` together, one static-shape step per token.

    Each :class:`~megatron_apbv.inference.prefill.Prefill` (run with
    ``max_new_tokens=settings.max_new_tokens``, all with the same model) may hold
    one or several sequences and its own prompt length; their caches are placed
    in one batched cache with per-sequence lengths. Every sequence stops on its
    own (at a stop id, or after ``max_new_tokens``); a finished one emits padding,
    which is dropped from its ids and not counted in the speed. Every rank of the
    APB-V group calls this with its own prefills of the same requests. ``should_stop()`` is asked
    every :data:`STOP_CHECK_EVERY` steps; the group stops together when it is true on any rank.
    ``fused_layers`` is :class:`~megatron_apbv.inference.decode_step.DecodeRunner`'s ``fused``.
    """
    first = prefills[0]
    device = first.logits.device
    group = context_parallel_group()
    world = dist.get_world_size(group)
    src = dist.get_global_rank(group, 0) if world > 1 else dist.get_rank()
    sampler = Sampler(settings, seed, prompt_ids=[p.prompt.input_ids for p in prefills])
    plain_greedy = sampler.temperature == 0 and sampler.penalty == 1.0  # the step's own argmax will do
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    cache = DecodeCache.from_prefills([p.cache for p in prefills])
    positions = torch.cat([_next_positions(p) for p in prefills], dim=-1)

    def choose(logits, greedy):
        token = greedy if plain_greedy else sampler(logits)
        if world > 1:  # every rank holds the same logits; one source keeps sampling in lockstep
            dist.broadcast(token, src=src, group=group)
        return token

    logits = torch.cat([p.logits for p in prefills])
    check_finite(logits, "the logits at the end of prefill", group)
    token = choose(logits, logits.argmax(-1))
    generated = [token]
    finite = FiniteTracker(device)  # decode steps: a device-side flag, checked once after the loop
    done = torch.isin(token, stop)
    capture_start = time.perf_counter()
    runner = Engine.of(first).decode_runner(cache, positions, cuda_graph=cuda_graphs, fused=fused_layers)
    capture_seconds = time.perf_counter() - capture_start if cuda_graphs else 0.0
    sync(device)
    start = time.perf_counter()
    stopped = False
    for step in range(1, settings.max_new_tokens):
        if step % STOP_CHECK_EVERY == 0 and bool(done.all()):
            break
        if step % STOP_CHECK_EVERY == 0 and should_stop is not None and any_rank(should_stop(), device, group):
            stopped = True
            break
        runner.feed(token)
        runner.step()
        finite.update(runner.logits, step)
        token = choose(runner.logits, runner.greedy)
        generated.append(torch.where(done, token.new_tensor(-1), token))  # finished rows emit padding
        done = done | torch.isin(token, stop)
    sync(device)
    decode_seconds = time.perf_counter() - start
    finite.check("the logits of a decode step", group)
    ids = torch.stack(generated, dim=1)  # [b, steps]
    rows = [[int(t) for t in row if t >= 0] for row in ids.tolist()]
    return BatchGeneration(
        generated_ids=rows,
        decode_seconds=decode_seconds,
        decode_tokens=int((ids[:, 1:] >= 0).sum()),
        decode_mode=runner.mode,
        capture_seconds=capture_seconds,
        stopped_by_signal=stopped,
        layers_path=runner.layers_path,
    )


def _next_positions(run: Prefill) -> torch.Tensor:
    """The position of each sequence's first generated token: ``[b]`` or ``[3, b]`` (text advances every axis)."""
    last = run.prompt.position_ids[..., -1:] + 1  # [1] or [3, 1]
    b = run.logits.shape[0]
    return last.expand(*last.shape[:-1], b).to(run.logits.device)


def stop_token_ids(cfg: RunConfig) -> list[int]:
    """``generate.stop_ids`` plus, with ``generate.stop_at_eos``, the checkpoint's end-of-sequence ids.

    As transformers does, ``generation_config.json`` wins over ``config.json`` (whose
    ``text_config`` holds them for Qwen2.5-VL).
    """
    ids = list(cfg.generate.stop_ids)
    if cfg.generate.stop_at_eos and cfg.model.checkpoint:
        ids += _checkpoint_eos_ids(cfg.model.checkpoint)
    return sorted(set(int(i) for i in ids))


def _checkpoint_eos_ids(folder: str) -> list[int]:
    eos = None
    generation = Path(folder) / "generation_config.json"
    if generation.is_file():
        try:
            eos = json.loads(generation.read_text()).get("eos_token_id")
        except ValueError as err:
            raise ValueError(
                f"{generation}: not valid JSON ({err}); fix it or set generate.stop_at_eos=false"
            ) from None
    if eos is None:  # load_config already read this config.json: it exists and parses
        hf = read_hf_config(folder)
        eos = hf.get("eos_token_id", (hf.get("text_config") or {}).get("eos_token_id"))
    return [eos] if isinstance(eos, int) else list(eos or [])


def command(args, cfg: RunConfig, env, device: torch.device) -> dict:
    """``apbv generate``: generated ids (and text, when there is a tokenizer) and timings."""
    record = {"world_size": env.world_size, **apbv_generate(cfg, device)}
    folder = cfg.model.tokenizer_dir
    if folder and has_tokenizer(folder):
        tokenizer = load_tokenizer(folder)
        record["generated_text"] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in record["generated_ids"]]
    return record
