"""``apbv bench``: APB-V side by side with dense, ring, Ulysses, Star and APB-like attention.

One launch (every rank of the CP group) times each method on the same input:

* ``dense``: rank 0 alone runs the whole prompt with :class:`DenseCoreAttention`
  (SDPA, flash on GPUs); the other ranks wait at the barrier;
* ``ring``: exact zigzag ring attention (:mod:`megatron_apbv.baselines.ring`);
* ``ulysses``: DeepSpeed-Ulysses all-to-all attention (:mod:`megatron_apbv.baselines.ulysses`);
* ``star``, ``apb_like``, ``apbv``: the APB-V layer with ``apbv.variant`` set to that
  variant (same anchor, window and passing budget otherwise).

Two levels:

* ``layer``: one core-attention call on random ``q``/``k``/``v`` of the configured
  head shape (``model.num_attention_heads``, ``num_query_groups``, ``kv_channels``),
  each rank holding its rows under the method's own layout;
* ``model``: the prefill of the configured Megatron model on the synthetic prompt
  (decoder and the last token's logits). The model is built once and each method
  swaps in its core attention, so every method runs the very same weights.

A length ``N`` keeps the configured system and query spans and tokens per frame
and changes the number of frames (the remainder goes to the system span), so the
prompt has exactly ``N`` tokens. Each number is the median of ``--repeat`` runs
after ``--warmup`` runs; a run's time is the slowest rank's (CUDA events on GPUs,
``perf_counter`` after a barrier on CPUs). Peak memory is ``max_memory_allocated``
per rank on GPUs (null on CPUs), over the method's runs with its inputs; at the
model level it includes the model's weights (the same for every method). Rank 0 prints a table, writes ``DIR/bench.jsonl``
and ``DIR/bench.png`` with ``--out DIR``, and returns the summary record.

(About 430 lines: the arguments, the per-method plans and the timing loop of both levels share
one rank's state; the output is in :mod:`megatron_apbv.bench.report`, the e2e level in
:mod:`megatron_apbv.bench.e2e`.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from pydantic import ValidationError

from megatron_apbv.bench.report import LEVELS, format_table, plot, write_jsonl
from megatron_apbv.methods import COMPARED, REFERENCE, get_method
from megatron_apbv.methods import METHODS as REGISTRY
from megatron_apbv.runtime.config import (
    ConfigError,
    RunConfig,
    without_variant_settings,
)
from megatron_apbv.runtime.distributed import LaunchEnv
from megatron_apbv.runtime.progress import Progress
from megatron_apbv.runtime.timing import Timing, time_method

METHODS = COMPARED
GPU_LENGTHS = (32768, 65536, 131072)
ULYSSES_KERNELS = ("sdpa", "apb")


# Arguments ----------------------------------------------------------------------------


def _methods(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [m for m in items if m not in REGISTRY]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}: choose from {','.join(REGISTRY)}")
    return items


def _lengths(text: str) -> tuple[int, ...]:
    try:
        items = tuple(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths {text!r}: comma-separated token counts, e.g. 32768,65536")
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"--lengths {text!r}: token counts must be >= 1")
    return items


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


def add_arguments(parser) -> None:
    parser.add_argument("--methods", type=_methods, default=METHODS,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--lengths", type=_lengths, default=None,
                        help="prompt lengths in tokens (default: 32768,65536,131072 on GPUs, the config's prompt on CPUs)")
    parser.add_argument("--level", choices=("layer", "model", "both", "e2e"), default="both",
                        help="one core-attention call, the whole model's prefill, or both (default); e2e: video "
                             "decode + vision tower + prefill + first token on one GPU (megatron_apbv/bench/e2e.py)")
    parser.add_argument("--source-size", default=None, metavar="HxW",
                        help="e2e: size of the source video frames before the resize to input.frame_size")
    parser.add_argument("--warmup", type=_count(0), default=2, help="untimed runs first (default 2)")
    parser.add_argument("--repeat", type=_count(1), default=5, help="timed runs; the median is reported (default 5)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write DIR/bench.jsonl and DIR/bench.png")
    parser.add_argument("--ulysses-kernel", choices=ULYSSES_KERNELS, default="sdpa",
                        help="Ulysses' local attention: sdpa (flash on GPUs) or apb (the APB Triton kernel)")


# Configs and layouts ------------------------------------------------------------------


def method_config(cfg: RunConfig, length: int, variant: Optional[str] = None) -> RunConfig:
    """``cfg`` with a synthetic prompt of exactly ``length`` tokens and, optionally, another APB-V variant.

    The system and query spans and the tokens per frame stay; the frame count
    changes and the remainder is added to the system span. A variant replaces
    the settings it fixes, as ``apbv.variant=...`` on the command line does.
    """
    data = cfg.model_dump()
    inp = data["input"]
    text = inp["system_tokens"] + inp["query_tokens"]
    if length <= text:
        raise ConfigError(
            f"bench length {length} leaves no video tokens after input.system_tokens + input.query_tokens = {text}: "
            "use longer --lengths or shorten those spans"
        )
    frames, extra = divmod(length - text, inp["tokens_per_frame"])
    data["input"] = {**inp, "kind": "synthetic", "video_frames": frames, "system_tokens": inp["system_tokens"] + extra}
    if variant is not None:
        data["apbv"] = {**without_variant_settings(data["apbv"], variant), "variant": variant}
    try:
        out = RunConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ConfigError(f"bench length {length}{f' variant {variant}' if variant else ''}: {problems}") from None
    assert out.prompt_len == length
    return out


@dataclass(frozen=True)
class Plan:
    """What this rank runs for one method at one length."""

    method: str
    cfg: RunConfig  # the method's config at this length (APB-V variants differ in apbv.*)
    indices: Optional[torch.Tensor]  # global token index of each local row; None: this rank only waits
    mask: object  # the core attention's attention_mask
    last_owner: Optional[int]  # CP rank holding the prompt's last token (None: every rank holds it)
    last_row: int  # its local row there


def plan_for(method: str, cfg: RunConfig, length: int, rank: int, world: int) -> Plan:
    """Layout, mask and last-token owner of ``method`` on ``rank`` for a prompt of ``length`` tokens."""
    chosen = get_method(method)
    c = method_config(cfg, length, chosen.variant)
    plan = chosen.rank_plan(c, rank, world)
    return Plan(method, c, plan.indices, plan.mask, plan.last_owner, plan.last_row)


def core_attention(method: str, config, layer_number: int, ulysses_kernel: str = "sdpa"):
    """The Megatron core-attention module of ``method`` for the layer level's single call."""
    from megatron.core.transformer.enums import AttnMaskType

    return get_method(method).core_attention_class()(
        config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal, attention_type="self",
        **_core_params(method, ulysses_kernel),
    )


def _core_params(method: str, ulysses_kernel: str) -> dict:
    return {"kernel": ulysses_kernel} if get_method(method).takes_kernel else {}


def method_model(weights, method: str, cfg: RunConfig, device: torch.device, ulysses_kernel: str = "sdpa"):
    """``method``'s GPTModel on the very parameters of ``weights`` (shared, not copied)."""
    from megatron_apbv.models.gpt import build_gpt_model

    return build_gpt_model(cfg, method=method, device=device, core_params=_core_params(method, ulysses_kernel),
                           weights_of=weights)


@dataclass(frozen=True)
class ModelInputs:
    plan: Plan
    ids: Optional[torch.Tensor]  # [b, local]; None where the rank only waits
    pos: Optional[torch.Tensor]


def method_inputs(method: str, cfg: RunConfig, prompt, rank: int, device: torch.device) -> ModelInputs:
    """This rank's token ids and global positions of ``prompt`` under ``method``'s layout."""
    plan = plan_for(method, cfg, cfg.prompt_len, rank, cfg.parallel.context_parallel_size)
    if plan.indices is None:
        return ModelInputs(plan, None, None)
    local = prompt.local(plan.indices)
    return ModelInputs(plan, local.input_ids.to(device), local.position_ids.to(device))


def _forward(model, rope, inputs: ModelInputs, rank: int):
    """The timed part of a prefill: the decoder on the local rows, the last token's logits where it lives."""
    from megatron_apbv.models.gpt import decoder_hidden, vocab_logits

    if inputs.ids is None:
        return None
    plan = inputs.plan
    hidden = decoder_hidden(model, rope, inputs.ids, inputs.pos, plan.mask)
    if plan.last_owner is None or plan.last_owner == rank:
        return vocab_logits(model, hidden[plan.last_row : plan.last_row + 1])
    return None


def _share_logits(logits, inputs: ModelInputs, cfg: RunConfig, device: torch.device) -> torch.Tensor:
    """The last token's logits on every rank (broadcast from the rank that holds the token)."""
    from megatron_apbv.runtime.groups import context_parallel_group

    owner = inputs.plan.last_owner
    if owner is None:
        return logits
    group = context_parallel_group()
    if logits is None:
        logits = torch.empty(cfg.input.batch_size, cfg.model.vocab_size, dtype=torch.float32, device=device)
    dist.broadcast(logits, src=dist.get_global_rank(group, owner), group=group)
    return logits


def method_logits(model, rope, inputs: ModelInputs) -> torch.Tensor:
    """Prefill ``model`` on ``inputs``; the last token's logits ``[b, vocab]`` on every rank."""
    from megatron_apbv.runtime.groups import context_parallel_rank

    device = next(model.parameters()).device
    logits = _forward(model, rope, inputs, context_parallel_rank())
    return _share_logits(logits, inputs, inputs.plan.cfg, device)


# The benchmark --------------------------------------------------------------------------


def _layer_qkv(cfg: RunConfig, length: int, dtype: torch.dtype):
    """The layer level's random ``q``/``k``/``v`` of the whole prompt (CPU, seeded: the same on every rank)."""
    m, b = cfg.model, cfg.input.batch_size
    g = torch.Generator().manual_seed(cfg.seed + length)
    return tuple(
        torch.randn(length, b, heads, m.head_dim, generator=g, dtype=dtype)
        for heads in (m.num_attention_heads, m.num_query_groups, m.num_query_groups)
    )


def _row(method: str, level: str, length: int, plan: Optional[Plan], timing: Optional[Timing], reason=None) -> dict:
    row = {"method": method, "level": level, "length": length}
    if timing is None or timing.status != "ok":
        row.update(median_ms=None, times_ms=None, peak_mem_gib=None, peak_mem_gib_per_rank=None,
                   status=reason or (timing.status if timing else "skipped"))
    else:
        row.update(
            median_ms=round(statistics.median(timing.times_ms), 4),
            times_ms=[round(t, 4) for t in timing.times_ms],
            peak_mem_gib=round(max(timing.peak_gib), 4) if timing.peak_gib else None,
            peak_mem_gib_per_rank=[round(p, 4) for p in timing.peak_gib] if timing.peak_gib else None,
            status="ok",
        )
    if plan is not None:
        row["local_tokens"] = None if plan.indices is None else len(plan.indices)
        if get_method(method).variant is not None:
            row.update(anchor_len=plan.cfg.anchor_len, passing_len=plan.cfg.passing_lens()[0],
                       query_len=plan.cfg.query_len)
    return row


def _compare_logits(rows: list[dict], logits: dict) -> None:
    """Model level: how far each method's next-token logits are from dense's (same weights, same prompt)."""
    ref = logits.get(REFERENCE)
    for r in rows:
        mine = logits.get(r["method"])
        ok = ref is not None and mine is not None
        r["logit_diff_vs_dense"] = (mine - ref).abs().max().item() if ok else None
        r["top1_agree_with_dense"] = bool((mine.argmax(-1) == ref.argmax(-1)).all()) if ok else None


def _add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_dense`` / ``speedup_vs_ring``: that method's median over this row's, per level and length."""
    base = {(r["level"], r["length"], r["method"]): r["median_ms"] for r in rows}
    for r in rows:
        for ref in ("dense", "ring"):
            ref_ms = base.get((r["level"], r["length"], ref))
            ok = ref_ms is not None and r["median_ms"]
            r[f"speedup_vs_{ref}"] = round(ref_ms / r["median_ms"], 4) if ok else None


def run_bench(cfg: RunConfig, env: LaunchEnv, device: torch.device, *, methods=METHODS, lengths=None,
              levels=LEVELS, warmup: int = 2, repeat: int = 5, out: Optional[str] = None,
              ulysses_kernel: str = "sdpa") -> dict:
    """Time every method at every length and level on every rank; rank 0's record is complete."""
    from megatron_apbv.models.gpt import (
        DTYPES,
        build_gpt_model,
        build_rope,
        transformer_config,
    )
    from megatron_apbv.models.inputs import build_prompt
    from megatron_apbv.runtime.groups import (
        context_parallel_group,
        context_parallel_rank,
    )

    if cfg.parallel.tensor_parallel_size != 1:
        raise ConfigError("apbv bench needs parallel.tensor_parallel_size=1 (the dense baseline holds every head)")
    world, rank, group = cfg.parallel.context_parallel_size, context_parallel_rank(), context_parallel_group()
    lengths = tuple(lengths or (GPU_LENGTHS if device.type == "cuda" else (cfg.prompt_len,)))
    for length in lengths:  # every config problem surfaces here, on every rank, before any collective
        for method in methods:
            method_config(cfg, length, get_method(method).variant)
    dtype = DTYPES[cfg.dtype]
    skips = {m: get_method(m).unsupported(cfg, world) for m in methods}
    leader = env.rank == 0
    bar = Progress(len(levels) * len(lengths) * len(methods), "apbv bench", enabled=leader)
    rows: list[dict] = []

    weights = rope = None  # built when the model level starts, so the layer level's peak memory excludes it
    layer_config = transformer_config(cfg, tensor_parallel_size=1, context_parallel_size=world)

    for level in levels:
        if level == "model":
            weights, rope = build_gpt_model(cfg, method="apbv", device=device), build_rope(cfg, device)
        for length in lengths:
            qkv = _layer_qkv(cfg, length, dtype) if level == "layer" else None
            prompt = build_prompt(method_config(cfg, length)) if level == "model" else None
            logits: dict[str, torch.Tensor] = {}  # model level: the last token's logits of each method
            for method in methods:
                bar.step(f"{level} N={length} {method}")
                note = None if skips[method] else get_method(method).startup_note(device)
                if note:
                    bar.note(note)
                plan = plan_for(method, cfg, length, rank, world)
                if skips[method]:
                    rows.append(_row(method, level, length, plan, None, f"skipped: {skips[method]}"))
                    continue
                if level == "layer":
                    timing = _time_layer(method, plan, qkv, layer_config, device, warmup, repeat, group,
                                         ulysses_kernel)
                    row = _row(method, level, length, plan, timing)
                else:
                    model = method_model(weights, method, plan.cfg, device, ulysses_kernel)
                    inputs = method_inputs(method, plan.cfg, prompt, rank, device)
                    timing = time_method(lambda: _forward(model, rope, inputs, rank), device, warmup, repeat, group)
                    row = _row(method, level, length, plan, timing)
                    if timing.status == "ok":
                        logits[method] = _share_logits(timing.result, inputs, plan.cfg, device)
                        timing.result = None
                backend = get_method(method).attention_backend(plan.cfg, rank, world, dtype, device)
                if backend is not None:
                    row["attention_backend"] = backend
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if level == "model":
                _compare_logits(rows[-len(methods):], logits)
            _add_ratios(rows)
            if leader and out:
                write_jsonl(Path(out) / "bench.jsonl", rows, _meta(cfg, device, world))
    bar.close()

    record = {
        "command": "bench",
        **_meta(cfg, device, world),
        "levels": list(levels),
        "lengths": list(lengths),
        "methods": list(methods),
        "warmup": warmup,
        "repeat": repeat,
        "rows": [{k: r.get(k) for k in ("method", "level", "length", "median_ms", "peak_mem_gib",
                                         "speedup_vs_dense", "speedup_vs_ring")} for r in rows],
    }
    if leader:
        sys.stderr.write(format_table(rows) + "\n")  # for people; the record (stdout) is for machines
        sys.stderr.flush()
        if out:
            record["out"] = {"jsonl": str(Path(out) / "bench.jsonl"), "png": str(Path(out) / "bench.png")}
            plot(rows, Path(out) / "bench.png", title=f"{record['device_name']} x{world}, {cfg.dtype}")
    return record


def _time_layer(method, plan: Plan, qkv, layer_config, device, warmup, repeat, group, ulysses_kernel) -> Timing:
    """One core-attention call of ``method`` on this rank's rows of the random ``q``/``k``/``v``."""
    if plan.indices is None:  # dense on ranks > 0: wait at the barriers
        return time_method(lambda: None, device, warmup, repeat, group)
    module = core_attention(method, layer_config, 1, ulysses_kernel).to(device)
    q, k, v = (t[plan.indices].to(device) for t in qkv)

    def call():
        with torch.inference_mode():
            return module(q, k, v, plan.mask)

    timing = time_method(call, device, warmup, repeat, group)
    timing.result = None
    return timing


def _meta(cfg: RunConfig, device: torch.device, world: int) -> dict:
    m = cfg.model
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "dtype": cfg.dtype,
        "heads": m.num_attention_heads,
        "kv_heads": m.num_query_groups,
        "head_dim": m.head_dim,
        "model_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "batch_size": cfg.input.batch_size,
    }


def command(args, cfg: RunConfig, env: LaunchEnv, device: torch.device) -> dict:
    """``apbv bench``."""
    if args.out:  # every rank, before any model is built: not after all the compute, on rank 0
        from megatron_apbv.runtime.outputs import check_output_dir

        names = ("e2e.jsonl",) if args.level == "e2e" else ("bench.jsonl", "bench.png")
        check_output_dir(args.out, "--out", names)
    if args.level == "e2e":
        from megatron_apbv.bench.e2e import E2E_METHODS, run_e2e

        size = tuple(int(x) for x in args.source_size.lower().split("x")) if args.source_size else None
        methods = tuple(m for m in args.methods if m in E2E_METHODS) if args.methods != METHODS else E2E_METHODS
        return run_e2e(cfg, device, methods=methods, source_size=size, warmup=args.warmup, repeat=args.repeat,
                       out=args.out)
    levels = LEVELS if args.level == "both" else (args.level,)
    return run_bench(cfg, env, device, methods=args.methods, lengths=args.lengths, levels=levels,
                     warmup=args.warmup, repeat=args.repeat, out=args.out, ulysses_kernel=args.ulysses_kernel)
