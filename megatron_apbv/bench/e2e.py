"""``apbv bench --level e2e``: time to first token of a video prompt on one GPU, per stage.

The paper's setting: Qwen2.5-VL on a 64-frame video, prefill plus the first
token with the vision encoder included. The bench drives the product's
:class:`~megatron_apbv.inference.engine.Engine`, so it times the very stages
``apbv infer`` and ``apbv generate`` run (``tests/test_bench_e2e.py`` checks that
both call the same stage code):

1. ``video_decode`` (:meth:`Engine.read_prompt`): with PyAV installed the source
   frames are written once (untimed) to an ``.mp4`` file and the stage decodes it
   as a request's ``input.video_path`` (``models.video``: decode, sample, resize on
   the CPU). Without PyAV the source frames are synthetic ``uint8`` frames in
   memory and the stage only resizes them to ``input.frame_size`` on the CPU (no
   codec work, which the record says: ``decode_source``);
2. ``vision`` (:meth:`Engine.embed`): patchify, the product's vision tower on every
   temporal group (one process, W = 1), the text embeddings with the video rows
   scattered in;
3. ``prefill`` (:meth:`Engine.prefill`): the decoder over the whole prompt with
   the method's core attention (``dense``: causal attention over everything;
   ``apbv``: the APB-V layer at W = 1), then the last token's logits; the first
   token is their argmax.

Each stage is timed with ``perf_counter`` after a device synchronisation
(:class:`~megatron_apbv.inference.stage_clock.StageClock`, as ``apbv infer
--pipeline serial``); the record gives the median over ``--repeat`` runs after
``--warmup`` runs. Stages 1-2 are the same work for both methods at W = 1, so each
repetition runs them once and both methods' prefills follow on the same
embeddings (each method's total counts them). Weights are random; the model is
built with its parameters initialised on the GPU (``init`` in the record; seeded,
but not the same numbers as a CPU build).

:func:`predict_scaling` turns the measured per-stage times into W = 2, 4, 8
predictions with the cost model (``megatron_apbv.costmodel``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_apbv.inference.engine import Engine
from megatron_apbv.inference.stage_clock import StageClock
from megatron_apbv.methods import REFERENCE, SERVED, get_method
from megatron_apbv.models.vision import vision_grid
from megatron_apbv.models.vision_tower import vision_tower_flops
from megatron_apbv.runtime.config import ConfigError, RunConfig

STAGES = ("video_decode", "vision", "prefill")
E2E_METHODS = (REFERENCE, SERVED)


def source_frames(cfg: RunConfig, source_size: tuple[int, int]) -> torch.Tensor:
    """Synthetic ``uint8 [T, H, W, 3]`` frames at the camera's ``source_size`` (before the model's resize).

    A smooth synthetic video at 1/8 of the size, upsampled by pixel repetition
    (generating at full size in float64 would take longer than everything timed).
    """
    from megatron_apbv.models.video import synthetic_video

    h, w = source_size
    small = synthetic_video(cfg.input.video_frames, -(-h // 8), -(-w // 8), seed=cfg.seed)
    return small.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :h, :w].contiguous()


def with_video_file(cfg: RunConfig, path: Path) -> RunConfig:
    """``cfg`` reading its frames from the video file ``path`` (``input.source`` probed as load_config does)."""
    from megatron_apbv.models.video import probe_video

    data = cfg.model_dump()
    data["input"] = {**data["input"], "video_path": str(path), "source": probe_video(path).model_dump()}
    return RunConfig.model_validate(data, strict=False)


class Pipeline:
    """The engine and the input of one config; :meth:`encode` and :meth:`prefill` time the stages once."""

    def __init__(self, cfg: RunConfig, device: torch.device, source_size: tuple[int, int], workdir: Path):
        self.cfg, self.device = cfg, device
        t0 = time.perf_counter()
        self.init = "device"
        # Parameters are created and drawn where they live (torch's default-device context):
        # a CPU draw of the 7B model's weights takes about a minute.
        with torch.device(device):
            self.engine = Engine.build(cfg, device, vision=True)
        StageClock(device, sync_first=True)  # waits for the device: the build is finished
        self.build_seconds = time.perf_counter() - t0
        self.source = source_frames(cfg, source_size)
        self.video_cfg, self.frames = cfg, None
        try:
            import av  # noqa: F401

            from megatron_apbv.models.video import write_video

            path = workdir / f"e2e_{source_size[0]}x{source_size[1]}.mp4"
            write_video(path, self.source)
            self.video_cfg = with_video_file(cfg, path)
            self.decode_source = f"PyAV decode of {path.name} (libx264/mpeg4), CPU resize"
        except ImportError:
            self.decode_source = ("synthetic uint8 frames in memory (PyAV not installed): the stage is the CPU "
                                  "resize only, no codec decode")
        self.clock = StageClock(device, sync_first=True)

    def encode(self):
        """Stages 1-2: the prompt, its input embeddings ``[N, b, h]`` (all tokens) and the seconds of each stage."""
        from megatron_apbv.models.video import resize_frames

        times: dict = {}
        with self.clock.stage("video_decode", times, gpu=False):
            frames = None
            if self.video_cfg.input.video_path is None:
                frames = resize_frames(self.source, tuple(self.cfg.input.frame_size))
            prompt = Engine.read_prompt(self.video_cfg, frames=frames)
        with self.clock.stage("vision", times):
            embeds = self.engine.embed(prompt, torch.arange(prompt.input_ids.shape[1]))
        return prompt, embeds, times

    def prefill(self, engine: Engine, prompt, embeds, plan) -> tuple[dict, int]:
        """Stage 3 of one method on its ``plan`` (a ``RankPlan`` at W = 1); seconds and the first token."""
        local = prompt.local(plan.indices)
        ids, pos = local.input_ids.to(self.device), local.position_ids.to(self.device)
        mine = embeds[plan.indices.to(embeds.device)]
        times: dict = {}
        with torch.inference_mode(), self.clock.stage("prefill", times):
            token = int(engine.prefill(ids, pos, plan.mask, mine).argmax(-1)[0])
        return times, token


def run_e2e(cfg: RunConfig, device: torch.device, *, methods=E2E_METHODS, source_size=None, warmup: int = 1,
            repeat: int = 1, out: Optional[str] = None, predict_gpus=(2, 4, 8)) -> dict:
    """Time every method end to end on one GPU; returns the record (also ``OUT/e2e.jsonl`` with ``out``)."""
    from megatron_apbv.models.gpt import DTYPES, build_gpt_model

    if cfg.input.kind != "video":
        raise ConfigError("apbv bench --level e2e needs input.kind=video (the vision tower is a stage)")
    if cfg.parallel.context_parallel_size != 1 or cfg.parallel.tensor_parallel_size != 1:
        raise ConfigError("apbv bench --level e2e runs on one GPU: parallel.context_parallel_size=1 and "
                          "tensor_parallel_size=1 (W > 1 is predicted from the measured stages)")
    bad = [m for m in methods if m not in E2E_METHODS]
    if bad:
        raise ConfigError(f"--methods {bad}: the e2e level times {', '.join(E2E_METHODS)}")
    source_size = tuple(source_size or cfg.input.frame_size)
    workdir = Path(out) if out else Path(".")
    workdir.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(cfg, device, source_size, workdir)
    dtype = DTYPES[cfg.dtype]
    m, v = cfg.model, cfg.vision
    record = {
        "command": "bench", "level": "e2e", "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "world_size": 1, "dtype": cfg.dtype,
        "model": {"layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_attention_heads,
                  "kv_heads": m.num_query_groups, "ffn": m.ffn_hidden_size, "vocab": m.vocab_size},
        "vision": {"depth": v.depth, "hidden": v.hidden_size, "heads": v.num_heads,
                   "fullatt_block_indexes": list(v.fullatt_block_indexes),
                   "tower": "the product's (models/vision_tower.py, built by inference/engine.py)"},
        "frames": cfg.input.video_frames, "source_size": list(source_size), "frame_size": list(cfg.input.frame_size),
        "prompt_tokens": cfg.prompt_len, "video_tokens": cfg.input.video_tokens(cfg.vision), "anchor_len": cfg.anchor_len,
        "passing_len": max(cfg.passing_lens()), "query_len": cfg.query_len,
        "weights": "random", "init": pipe.init, "build_seconds": round(pipe.build_seconds, 3),
        "vision_flop": vision_tower_flops(v, vision_grid(v, cfg.input.video_frames,
                                                         tuple(cfg.input.frame_size)).grid_thw(),
                                          out_hidden_size=m.hidden_size),
        "decode_source": pipe.decode_source, "warmup": warmup, "repeat": repeat, "methods": {},
    }
    # each method's rows and mask at W = 1, and the kernel route its attention takes (the registry's)
    plans = {method: (get_method(method).rank_plan(cfg, 0, 1),
                      get_method(method).attention_backend(cfg, 0, 1, dtype, device)) for method in methods}
    # each method's decoder on the very weights of the engine's, with the engine's tower and RoPE
    engines = {method: pipe.engine.with_model(build_gpt_model(cfg, method=method, device=device,
                                                                weights_of=pipe.engine.model))
               for method in methods}
    runs = {method: [] for method in methods}
    tokens = {}
    # Decode and vision are the same work for every method at W = 1: they run once per repetition
    # and count in every method's total; each method's prefill then runs on the same embeddings.
    for i in range(warmup + repeat):
        prompt, embeds, shared = pipe.encode()
        for method in methods:
            times, tokens[method] = pipe.prefill(engines[method], prompt, embeds, plans[method][0])
            times = {**shared, **times}
            print(f"e2e {method} run {i}: " + " ".join(f"{k} {s:.3f}s" for k, s in times.items()), file=sys.stderr,
                  flush=True)
            if i >= warmup:
                runs[method].append(times)
        del embeds
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for method in methods:
        stages = {k: statistics.median(r[k] for r in runs[method]) for k in STAGES}
        record["methods"][method] = {
            "stages_s": {k: round(s, 4) for k, s in stages.items()},
            "total_s": round(sum(stages.values()), 4),
            "vision_tflops_per_s": round(record["vision_flop"] / stages["vision"] / 1e12, 3) if stages["vision"] else None,
            "runs_s": [{k: round(s, 4) for k, s in r.items()} for r in runs[method]],
            "first_token_id": tokens[method],
            "attention_backend": plans[method][1],
        }
    record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" \
        else None
    if predict_gpus:
        record["predicted"] = predict_scaling(cfg, record, predict_gpus)
    if out:
        with open(Path(out) / "e2e.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    sys.stderr.write(format_e2e(record) + "\n")
    return record


def predict_scaling(cfg: RunConfig, record: dict, gpus=(2, 4, 8), gpu: str = "h200",
                    interconnect: str = "nvlink") -> dict:
    """W-GPU time to first token of APB-V from the measured W = 1 stages.

    * ``video_decode``: the largest rank's share of the temporal groups (each
      rank decodes only its own frames, as the job and ``apbv generate`` do:
      :mod:`megatron_apbv.costmodel.video_decode`);
    * ``vision``: the same share (each rank encodes its temporal groups,
      ``models.vision.encode_frames_distributed``) plus the all-gather of the
      embeddings (``Cluster.allgather_s``);
    * ``prefill``: the measured W = 1 time times the cost model's ratio
      ``predict(apbv, W) / predict(apbv, 1)`` (same prompt and budgets).

    Also the same for ``dense`` (one GPU whatever W), so ``speedup_vs_dense``.
    The limiting stage is the one with the largest share of the W-GPU time.
    """
    from megatron_apbv.costmodel.calibration import Profiles
    from megatron_apbv.costmodel.predict import predict
    from megatron_apbv.costmodel.shapes import ModelShape
    from megatron_apbv.costmodel.video_decode import largest_group_share, video_decode_seconds

    measured = record["methods"].get(SERVED)
    if measured is None:
        return {}
    profiles = Profiles.load()
    shape = ModelShape.from_config(cfg)
    n = cfg.prompt_len
    kwargs = dict(anchor_len=cfg.anchor_len, query_len=cfg.query_len, passing=list(cfg.passing_lens()))
    base = predict(SERVED, shape, profiles.cluster(gpu, interconnect, 1), n, **kwargs).seconds
    stages = measured["stages_s"]
    dense_total = record["methods"].get(REFERENCE, {}).get("total_s")
    emb_bytes = record["video_tokens"] * cfg.model.hidden_size * shape.dtype_bytes
    out = {"model": f"costmodel {gpu}/{interconnect}, prefill scaled from the measured W = 1 apbv prefill"}
    for w in gpus:
        cluster = profiles.cluster(gpu, interconnect, w)
        ratio = predict(SERVED, shape, cluster, n, **kwargs).seconds / base
        groups = cfg.input.frame_plan(cfg.vision).groups
        pred = {
            "video_decode": video_decode_seconds(stages["video_decode"], groups, w),
            "vision": stages["vision"] * largest_group_share(groups, w) + cluster.allgather_s(emb_bytes),
            "prefill": stages["prefill"] * ratio,
        }
        total = sum(pred.values())
        out[str(w)] = {
            "stages_s": {k: round(s, 4) for k, s in pred.items()},
            "total_s": round(total, 4),
            "speedup_vs_w1": round(measured["total_s"] / total, 3),
            "speedup_vs_dense": round(dense_total / total, 3) if dense_total else None,
            "limiting_stage": max(pred, key=pred.get),
            "stage_share": {k: round(s / total, 3) for k, s in pred.items()},
        }
    return out


def format_e2e(record: dict) -> str:
    head = f"e2e {record['device_name']}: {record['frames']} frames {record['frame_size']}, " \
           f"{record['prompt_tokens']} tokens, {record['model']['layers']} layers"
    lines = [head, f"{'method':<8} " + " ".join(f"{s:>12}" for s in STAGES) + f" {'total':>9}"]
    for name, r in record["methods"].items():
        lines.append(f"{name:<8} " + " ".join(f"{r['stages_s'][s]:>12.3f}" for s in STAGES) + f" {r['total_s']:>9.3f}")
    for w, p in record.get("predicted", {}).items():
        if w == "model":
            continue
        lines.append(f"apbv W={w:<2} " + " ".join(f"{p['stages_s'][s]:>12.3f}" for s in STAGES)
                     + f" {p['total_s']:>9.3f}  limit: {p['limiting_stage']}")
    return "\n".join(lines)
