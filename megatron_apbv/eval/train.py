"""Train the needle model: Megatron GPT (dense attention) + patch front end, on the train split.

    python -m megatron_apbv.eval.train configs/needle.yaml --out checkpoints/needle [--steps ...]

One process, one device (a GPU when present). Loss: cross-entropy of the answer
token after the question, plus ``--aux-weight`` x cross-entropy of the *scene state*
of every video and question token (the colour of the latest scene card so far,
``NONE`` before the first): a dense per-frame caption that teaches the model to
carry the scene from frame to frame, as a video model tracks what is going on.
Afterwards the held-out split is scored densely, and, as a quick single-process
cross-check, through the reference oracle's APB-V / Star masks. Writes
``needle.safetensors`` (weights + metadata) and ``train_log.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_apbv.eval.frontend import (
    build_frontend,
    decoder_logits,
    prompt_embeddings,
    save_checkpoint,
)
from megatron_apbv.eval.needle import (
    QUESTION_TYPES,
    NeedleGeometry,
    collate,
    evidence_is_local,
    heldout_set,
    make_example,
)
from megatron_apbv.models.resolve import load_config


class TrainStream(torch.utils.data.IterableDataset):
    """Collated train batches in a fixed order for a given number of workers ``n``.

    Worker ``w`` makes steps ``w, w + n, ...`` (the DataLoader hands them out in that
    order); its ``k``-th batch holds train examples ``w + n * (k * batch + j)``, j < batch.
    ``schedule`` ``[(until_step, frames), ...]`` shortens the videos of early batches (a
    curriculum); later batches have the configured number of frames.
    """

    def __init__(self, geo: NeedleGeometry, batch: int, schedule=()):
        self.geo, self.batch, self.schedule = geo, batch, tuple(schedule)

    def frames_at(self, step: int) -> int:
        return next((f for until, f in self.schedule if step < until), self.geo.frames)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        step, k = wid, 0
        while True:
            geo = replace(self.geo, frames=self.frames_at(step))
            index = [wid + n * (k * self.batch + j) for j in range(self.batch)]
            batch = collate([make_example(geo, "train", i) for i in index])
            batch["video_frames"] = geo.frames
            yield batch
            step, k = step + n, k + 1


def parse_curriculum(text: str | None) -> list[tuple[int, int]]:
    """``"16:400,32:800"`` -> ``[(400, 16), (800, 32)]``: 16 frames before step 400, 32 before 800."""
    if not text:
        return []
    out = []
    for item in text.split(","):
        frames, until = item.split(":")
        out.append((int(until), int(frames)))
    return sorted(out)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def losses(model, frontend, rope, geo, batch, device, aux_weight, autocast):
    geo = replace(geo, frames=int(batch.get("video_frames", geo.frames)))
    ids = batch["input_ids"].to(device, non_blocking=True)
    frames = batch["frames"].to(device, non_blocking=True)
    answer = batch["answer"].to(device)
    targets = batch["targets"].to(device)  # [b, 3, N]
    pos = torch.arange(geo.prompt_len, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        embeds = prompt_embeddings(model, frontend, geo, ids, frames)
        rows = slice(geo.video_start, geo.prompt_len) if aux_weight > 0 else slice(geo.prompt_len - 1, None)
        logits, hidden = decoder_logits(model, rope, embeds, pos, rows=rows, return_hidden=True)
        logits = logits.float()  # [r, b, V]
    main = F.cross_entropy(logits[-1], answer)
    pred = logits[-1].argmax(-1)
    aux = torch.zeros((), device=device)
    if aux_weight > 0:
        # Per-token probe targets: current scene, needle colour once seen, scene of the needle.
        probe = frontend.probe(hidden.float()).view(hidden.shape[0], hidden.shape[1], 3, -1)  # [r, b, 3, 9]
        target = targets[:, :, geo.video_start : geo.prompt_len].permute(2, 0, 1)  # [r, b, 3]
        aux = F.cross_entropy(probe.reshape(-1, probe.shape[-1]), target.reshape(-1)) * 3
    return main + aux_weight * aux, main, aux, (pred == answer).float().mean()


@torch.no_grad()
def dense_accuracy(model, frontend, rope, geo, examples, device, batch_size, autocast):
    """Answers of the dense model: list of predicted token ids."""
    preds = []
    pos = torch.arange(geo.prompt_len, device=device)
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i : i + batch_size])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            embeds = prompt_embeddings(model, frontend, geo, b["input_ids"].to(device), b["frames"].to(device))
            logits = decoder_logits(model, rope, embeds, pos, rows=slice(geo.prompt_len - 1, None))
        preds += logits[-1].float().argmax(-1).tolist()
    return preds


def summarize(examples, preds) -> dict:
    out = {"n": len(examples), "accuracy": sum(p == e.answer for p, e in zip(preds, examples)) / len(examples)}
    for q in QUESTION_TYPES:
        sub = [(p, e) for p, e in zip(preds, examples) if e.question == q]
        if sub:
            out[f"accuracy_{q}"] = sum(p == e.answer for p, e in sub) / len(sub)
    return out


@torch.no_grad()
def oracle_check(cfg, model, frontend, geo, examples, device, worlds=(2, 4)) -> dict:
    """Single-process APB-V / Star answers through the reference mask (a quick look, not the benchmark)."""
    from megatron_apbv.apbv.layout import Span
    from megatron_apbv.apbv.reference import apbv_block_bounds_reference
    from megatron_apbv.eval.oracle import oracle_spec
    from megatron_apbv.methods import get_method
    from megatron_apbv.models.gpt import build_gpt_model, build_rope

    settings: dict = {}
    om = build_gpt_model(cfg, method="dense", device=device, layer_spec=oracle_spec(settings))
    om.load_state_dict(model.state_dict())
    rope = build_rope(cfg, device)
    n, a, q = geo.prompt_len, cfg.anchor_len, geo.query_tokens
    p128 = math.ceil(n / 128)
    results = {}
    for world in worlds:
        for method in ("star", "apbv", "apb_like"):  # zigzag and Star's budget are the registry's
            chosen = get_method(method)
            fixed = chosen.fixed_passing(n)
            name, passing = (method, fixed) if fixed is not None else (f"{method}_p128", p128)
            zigzag = chosen.setting("zigzag")
            settings.clear()
            settings.update(mode="apbv", world_size=world, anchor_len=a, query_len=q, passing_len=passing,
                            zigzag=zigzag, window=cfg.apbv.window)
            preds = dense_accuracy(om, frontend, rope, geo, examples, device, 4, autocast=False)
            rec = summarize(examples, preds)
            spans = [Span(s, e) for s, e in apbv_block_bounds_reference(n, world_size=world, anchor_len=a,
                                                                            query_len=q, zigzag=zigzag)]
            cross = [(p, e) for p, e in zip(preds, examples)
                     if e.question == "scene" and not evidence_is_local(geo, e, spans, a)]
            rec["scene_cross_n"] = len(cross)
            rec["scene_cross_accuracy"] = sum(p == e.answer for p, e in cross) / max(1, len(cross))
            results[f"W{world}_{name}"] = rec
    settings.clear()
    return results


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    ap = argparse.ArgumentParser(prog="python -m megatron_apbv.eval.train", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", default="checkpoints/needle")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--aux-weight", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-minutes", type=float, default=4.5, help="stop early (and say so) past this")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after this many steps (the LR schedule still spans --steps): replays a run cut by time")
    ap.add_argument("--eval-examples", type=int, default=512)
    ap.add_argument("--oracle-examples", type=int, default=0, help="single-process APB-V/Star cross-check")
    ap.add_argument("--no-autocast", action="store_true", help="fp32 instead of bf16 autocast (GPU)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--curriculum", default=None,
                    help="shorter videos first: FRAMES:UNTIL_STEP,... e.g. 16:300,32:600,64:900")
    args = ap.parse_args(argv)

    from megatron_apbv.models.gpt import build_gpt_model, build_rope
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown

    cfg = load_config(args.config, args.overrides + ["parallel.context_parallel_size=1"])
    from megatron_apbv.runtime.outputs import check_output_dir

    check_output_dir(args.out, "--out", ("needle.safetensors", "train_log.json"))  # before the training, not after
    geo = NeedleGeometry.from_config(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    autocast = device.type == "cuda" and not args.no_autocast
    if device.type == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    init_distributed(cfg, LaunchEnv(0, 1, 0), device)
    try:
        model = build_gpt_model(cfg, method="dense", device=device).train()
        frontend = build_frontend(geo, cfg.model.hidden_size, device).train()
        rope = build_rope(cfg, device)
        params = list(model.parameters()) + list(frontend.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
        loader = torch.utils.data.DataLoader(
            TrainStream(geo, args.batch, parse_curriculum(args.curriculum)), batch_size=None, num_workers=args.workers,
            pin_memory=device.type == "cuda", prefetch_factor=4 if args.workers else None,
        )
        n_params = sum(p.numel() for p in params)
        print(f"needle train: N={geo.prompt_len} tokens, {n_params} parameters, device={device}, "
              f"batch={args.batch}, steps={args.steps}", flush=True)
        log, start, window = [], time.perf_counter(), []
        stopped_early = False
        it = iter(loader)
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, args.steps, args.lr, args.warmup)
            loss, main_loss, aux, acc = losses(model, frontend, rope, geo, next(it), device, args.aux_weight,
                                               autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            window.append((main_loss.item(), aux.item(), acc.item()))
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                m = [sum(x) / len(window) for x in zip(*window)]
                rec = {"step": step + 1, "seconds": round(time.perf_counter() - start, 1), "answer_loss": round(m[0], 4),
                       "state_loss": round(m[1], 4), "train_accuracy": round(m[2], 4)}
                log.append(rec)
                print(json.dumps(rec), flush=True)
                window = []
            if args.stop_after is not None and step + 1 >= args.stop_after:
                stopped_early = True
                break
            if time.perf_counter() - start > args.max_minutes * 60:
                stopped_early = True
                print(f"stopping early at step {step + 1}: past --max-minutes", flush=True)
                break
        train_seconds = time.perf_counter() - start
        steps_done = step + 1
        model.eval()
        frontend.eval()

        examples = heldout_set(geo, args.eval_examples)
        t0 = time.perf_counter()
        preds = dense_accuracy(model, frontend, rope, geo, examples, device, 32, autocast)
        heldout = summarize(examples, preds)
        heldout["seconds"] = round(time.perf_counter() - t0, 1)
        print("held-out dense:", json.dumps(heldout), flush=True)

        command = "python -m megatron_apbv.eval.train " + " ".join(argv if argv is not None else sys.argv[1:])
        record = {
            "command": command,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "prompt_tokens": geo.prompt_len,
            "parameters": n_params,
            "steps": steps_done,
            "stopped_early": stopped_early,
            "train_seconds": round(train_seconds, 1),
            "examples_seen": steps_done * args.batch,
            "args": vars(args),
            "heldout_dense": heldout,
            "log": log,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"config": cfg.model_dump(mode="json"), "train": {k: v for k, v in record.items() if k != "log"}}
        save_checkpoint(out / "needle.safetensors", model, frontend, meta)
        if args.oracle_examples:
            t0 = time.perf_counter()
            record["oracle_check"] = oracle_check(cfg, model, frontend, geo, examples[: args.oracle_examples], device)
            record["oracle_check"]["seconds"] = round(time.perf_counter() - t0, 1)
            print("oracle check:", json.dumps(record["oracle_check"]), flush=True)
        from megatron_apbv.runtime.atomic import atomic_write_text

        atomic_write_text(out / "train_log.json", json.dumps(record, indent=1) + "\n")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
