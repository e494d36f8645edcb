"""Generation: APB-V prefill, then decoding over the distributed KV cache (spec "Decoding")."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_apbv.apbv.decode import DecodeStep
from megatron_apbv.inference.engine import Engine
from megatron_apbv.inference.prefill import apbv_prefill
from megatron_apbv.models.chat_prompt import has_tokenizer, load_tokenizer
from megatron_apbv.models.checkpoint import read_hf_config
from megatron_apbv.models.gpt import decoder_hidden, vocab_logits
from megatron_apbv.models.inputs import Prompt
from megatron_apbv.runtime.config import GenerateConfig, RunConfig
from megatron_apbv.runtime.groups import context_parallel_group
from megatron_apbv.runtime.timing import sync


class Sampler:
    """Greedy (``temperature == 0``) or temperature / top-p sampling from a seeded generator."""

    def __init__(self, settings: GenerateConfig, seed: int):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next ids ``[b]`` from logits ``[b, vocab]``."""
        if self.settings.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.double().cpu() / self.settings.temperature, dim=-1)
        if self.settings.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.settings.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0].to(logits.device)


def apbv_generate(
    cfg: RunConfig,
    device: torch.device,
    *,
    engine: Optional[Engine] = None,
    prompt: Optional[Prompt] = None,
    barrier: bool = True,
) -> dict:
    """Prefill with APB-V, then decode ``cfg.generate.max_new_tokens`` tokens; returns ids and timings.

    Every rank runs the layers for each new token (their outputs are identical
    after the merge); only the tail owner appends K/V, projects onto the
    vocabulary and samples, and the id is broadcast to the group. ``engine``,
    ``prompt`` and ``barrier`` go to :func:`apbv_prefill` (``apbv infer`` passes
    its engine and each request's prompt).
    """
    settings = cfg.generate
    stop_ids = stop_token_ids(cfg)  # a broken generation_config.json fails here, on every rank, before collectives
    run = apbv_prefill(
        cfg, device, max_new_tokens=settings.max_new_tokens, engine=engine, prompt=prompt, barrier=barrier
    )
    cache, seq = run.cache, run.seq
    group = context_parallel_group()
    tail = dist.get_global_rank(group, seq.tail_rank) if dist.get_world_size(group) > 1 else dist.get_rank()
    sampler = Sampler(settings, cfg.seed)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)

    def broadcast(ids):
        dist.broadcast(ids, src=tail, group=group)
        return ids

    token = broadcast(sampler(run.logits) if cache.is_tail else torch.empty_like(run.logits[:, 0], dtype=torch.long))
    generated = [token]
    done = torch.isin(token, stop)
    last_position = run.prompt.position_ids[..., -1:].to(device)
    start = time.perf_counter()
    for step in range(1, settings.max_new_tokens):
        if bool(done.all()):
            break
        position = last_position + step
        hidden = decoder_hidden(run.model, run.rope, token[:, None], position, DecodeStep(cache))
        logits = vocab_logits(run.model, hidden) if cache.is_tail else None
        token = broadcast(sampler(logits) if cache.is_tail else torch.empty_like(token))
        token = torch.where(done, token.new_tensor(-1), token)  # finished rows emit padding
        generated.append(token)
        done |= torch.isin(token, stop)
    sync(device)
    decode_seconds = time.perf_counter() - start
    ids = torch.stack(generated, dim=1)  # [b, steps]
    steps = ids.shape[1]
    return {
        "prompt_tokens": seq.prompt_len,
        "generated_ids": [[int(t) for t in row if t >= 0] for row in ids.tolist()],
        "prefill_seconds": round(run.seconds, 6),
        "decode_seconds": round(decode_seconds, 6),
        "decode_tokens_per_second": round((steps - 1) * ids.shape[0] / decode_seconds, 3) if steps > 1 else None,
        "cache_tokens_on_rank0": cache.num_tokens,
        "stop_ids": stop_ids,
        "stage_seconds": {**run.stage_seconds, "decode": decode_seconds},
    }


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
