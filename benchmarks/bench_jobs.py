"""apbv infer on one GPU: the serial pipeline vs the pipelined one, on real mp4 files, in one launch.

    PYTHONPATH=$PWD python benchmarks/bench_jobs.py                    # GPU: Qwen2.5-VL-7B shape, random weights
    PYTHONPATH=$PWD python benchmarks/bench_jobs.py --tiny             # CPU check: tiny model, small videos

Makes ``--videos`` mp4 files with PyAV (durations 8-64 s, 480p to 1440p, landscape, portrait, square
and wide aspect ratios; smooth synthetic content at a low frame rate so that writing them is fast),
builds the model once (configs/qwen25vl_7b_e2e.yaml, random weights) and runs ``apbv infer``'s job
(``megatron_apbv.jobs.infer``, one process, world 1) on every video with ``--pipeline serial`` and
``--pipeline pipelined`` for each answer length (``--answer-tokens``, default 32 and 256; no stop ids,
so every answer has exactly that many tokens). Each request samples its video at ``input.fps`` under
the job's pixel caps (``input.max_frames``, ``input.max_pixels``), so the requests differ in frames,
size and prompt length. Writes ``{"device", "rows": [{"mode", "answer_tokens", "requests", "wall_s",
"requests_per_second", "gpu_busy_fraction", "stage_seconds", ...}], "plan", "checks"}`` to ``--out``
(default ``benchmarks/results/jobs_gpu.json``, ``--tiny``: ``jobs_cpu_tiny.json``) and prints it.
``checks`` compares each pipelined answer with the serial one (greedy: they should be equal) and states
the issue's targets (pipelined/serial requests/s, GPU busy). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "qwen25vl_7b_e2e.yaml"

# (height, width) of the source videos: 480p to 1440p, 16:9, 4:3, 9:16, 1:1, 21:9
SIZES = [(480, 854), (480, 640), (720, 1280), (720, 960), (1080, 1920), (1080, 1080), (1440, 2560), (1440, 1920),
         (854, 480), (1280, 720), (1080, 2520), (960, 960)]
DURATIONS = [8, 12, 16, 24, 32, 40, 48, 64]
# The job's sampling: 1 frame per second, at most 32 frames and 256 tokens per frame (a 4k-token video at most),
# so that the 7B shape answers 24 requests x 2 pipelines x 2 answer lengths within a few minutes.
GPU_JOB = ["input.video_frames=null", "input.frame_size=null", "input.fps=1.0", "input.min_frames=4",
           "input.max_frames=32", f"input.max_pixels={256 * 28 * 28}", f"input.min_pixels={64 * 28 * 28}",
           "input.system_tokens=64", "input.query_tokens=64", "parallel.context_parallel_size=1",
           "parallel.timeout_seconds=900"]
TINY_JOB = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "model.vocab_size=256", "model.mrope_section=[2,3,3]", "dtype=float32",
    "device=cpu", "vision.depth=2", "vision.hidden_size=32", "vision.num_heads=2", "vision.intermediate_size=64",
    "vision.fullatt_block_indexes=[1]", "input.video_frames=null", "input.frame_size=null", "input.fps=0.5",
    "input.min_frames=2", "input.max_frames=8", f"input.max_pixels={12 * 28 * 28}", f"input.min_pixels={4 * 28 * 28}",
    "input.system_tokens=8", "input.query_tokens=5", "apbv.anchor=4", "parallel.context_parallel_size=1",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def video_plan(count: int, tiny: bool) -> list[dict]:
    """``count`` videos cycling through the sizes and durations (tiny: the same shapes at 1/8 the size)."""
    out = []
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        seconds = DURATIONS[(i * 5) % len(DURATIONS)]
        if tiny:
            h, w, seconds = max(2 * (h // 16), 32), max(2 * (w // 16), 32), max(seconds // 4, 4)
        out.append({"name": f"v{i:02d}_{h}x{w}_{seconds}s.mp4", "height": h, "width": w, "seconds": seconds})
    return out


def write_synthetic_mp4(path: Path, height: int, width: int, seconds: int, fps: int, seed: int) -> None:
    """A smooth moving pattern, made at 1/8 of the size and upsampled, encoded frame by frame with PyAV."""
    import av

    from megatron_apbv.models.video import video_codec

    rng = np.random.default_rng(seed)
    sh, sw = -(-height // 8), -(-width // 8)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, 3)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(video_codec(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"} if video_codec() == "libx264" else {}
        for t in range(seconds * fps):
            small = np.stack([np.sin(xx / (7 + c) + yy / (11 + c) + t / 3 + phase[c]) for c in range(3)], -1)
            small = ((small + 1) * 127.5).astype(np.uint8)
            frame = np.repeat(np.repeat(small, 8, 0), 8, 1)[:height, :width]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_result(out: Path, result: dict) -> None:
    """Write ``result`` to ``out`` whole (the runtime's atomic write: a reader never sees half)."""
    from megatron_apbv.runtime.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check: a tiny model and small videos")
    parser.add_argument("--videos", type=int, default=24, help="mp4 files = requests per run (default 24)")
    parser.add_argument("--answer-tokens", default=None, help="comma-separated (default 32,256; --tiny: 4,16)")
    parser.add_argument("--batch-size", type=int, default=8, help="jobs.batch_size of the pipelined runs")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/jobs_gpu.json)")
    parser.add_argument("--workdir", default=None, help="where the videos and answers go (default: a temp dir)")
    args = parser.parse_args()
    answer_tokens = [int(x) for x in (args.answer_tokens or ("4,16" if args.tiny else "32,256")).split(",")]
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("jobs_cpu_tiny.json" if args.tiny else "jobs_gpu.json"))
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench_jobs.py needs a CUDA GPU (or --tiny for the CPU check)")
    if args.tiny:  # the CPU check: one intra-op thread, or idle OpenMP threads spinning on a shared
        torch.set_num_threads(1)  # CPU distort the serial run (by 5-10x on a loaded 2-core machine)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_jobs_"))
    workdir.mkdir(parents=True, exist_ok=True)

    from megatron_apbv.inference.engine import Engine
    from megatron_apbv.jobs.infer import _run_job
    from megatron_apbv.jobs.requests import plan_requests, read_requests
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, select_device, shutdown
    from megatron_apbv.models.resolve import load_config
    from megatron_apbv.runtime.outputs import OutputLock

    job = (TINY_JOB if args.tiny else GPU_JOB) + [f"jobs.batch_size={args.batch_size}"]
    videos = video_plan(args.videos, args.tiny)
    plan = {
        "videos": len(videos), "answer_tokens": answer_tokens, "modes": ["serial", "pipelined"],
        "runs": 2 * len(answer_tokens), "requests_per_run": len(videos), "config": str(CONFIG.relative_to(ROOT)),
        "job_overrides": job, "weights": "random",
        "expected_minutes_h100": None if args.tiny else "about 4-6 (build 0.5, videos 0.5-1, serial runs 2-3, "
                                                        "pipelined runs 1)",
    }
    log("bench_jobs plan: " + json.dumps(plan))

    t0 = time.perf_counter()
    for i, v in enumerate(videos):
        write_synthetic_mp4(workdir / v["name"], v["height"], v["width"], v["seconds"], fps=2, seed=i)
    log(f"bench_jobs: wrote {len(videos)} mp4 files in {time.perf_counter() - t0:.1f} s ({workdir})")

    cfg = load_config(CONFIG, job)
    env = LaunchEnv(0, 1, 0)
    device = select_device(cfg, env)
    store = init_distributed(cfg, env, device)  # the job's store: the work queue of every run below
    rows, answers = [], {}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        t0 = time.perf_counter()
        with torch.device(device):  # parameters drawn where they live (a CPU draw of 7B takes a minute)
            engine = Engine.build(cfg, device, vision=True)
        log(f"bench_jobs: model and tower built in {time.perf_counter() - t0:.1f} s on {device}")
        for tokens in answer_tokens:
            requests = workdir / f"requests_{tokens}.jsonl"
            requests.write_text("".join(json.dumps({"id": v["name"], "input.kind": "video",
                                                    "input.video_path": str(workdir / v["name"]),
                                                    "generate.max_new_tokens": tokens}) + "\n" for v in videos))
            planned = plan_requests(read_requests(requests), CONFIG, job)
            for mode in ("serial", "pipelined"):
                output = workdir / f"answers_{mode}_{tokens}.jsonl"
                output.unlink(missing_ok=True)
                with OutputLock.acquire(output, "--output", str(output)) as claim:  # as `apbv infer` does
                    run_args = argparse.Namespace(prepared=planned, output=str(output), quiet=True, pipeline=mode,
                                                  output_claim=claim, store=store)
                    summary = _run_job(run_args, cfg, env, device, {"signal": False}, engine=engine)
                records = [json.loads(line) for line in output.read_text().splitlines()]
                errors = [r for r in records if "error" in r]
                if errors:
                    raise SystemExit(f"bench_jobs: {len(errors)} request(s) failed, e.g. {errors[0]}")
                answers[(mode, tokens)] = {r["id"]: r["generated_ids"] for r in records}
                rows.append({
                    "mode": mode, "answer_tokens": tokens, "requests": summary["answered"],
                    "wall_s": summary["seconds"], "requests_per_second": summary["requests_per_second"],
                    "gpu_busy_fraction": summary["gpu_busy_fraction"], "stage_seconds": summary["stage_seconds"],
                    "prompt_tokens_per_second": summary["prompt_tokens_per_second"],
                    "generated_tokens_per_second": summary["generated_tokens_per_second"],
                    "batch_size": summary["batch_size"], "prefetch_depth": summary["prefetch_depth"],
                    "prefetch_workers": summary["prefetch_workers"],
                    "prompt_tokens": sorted(r["prompt_tokens"] for r in records),
                })
                log(f"bench_jobs: {mode} {tokens}-token answers: {json.dumps(rows[-1])}")
                # Each row as it comes, so that a run cut short by its time limit still leaves what it measured.
                write_result(out, {"device": device_name, "rows": rows, "plan": plan, "partial": True})
    finally:
        shutdown(wait_for_peers=False)

    checks = {}
    for tokens in answer_tokens:
        serial, piped = answers[("serial", tokens)], answers[("pipelined", tokens)]
        same = sum(serial[k] == piped[k] for k in serial)
        r = {row["mode"]: row for row in rows if row["answer_tokens"] == tokens}
        checks[str(tokens)] = {
            "answers_equal": f"{same}/{len(serial)}",
            "speedup_requests_per_second": round(r["pipelined"]["requests_per_second"]
                                                 / r["serial"]["requests_per_second"], 3),
            "target_speedup": 2.0 if tokens >= 256 else 1.3,
            "gpu_busy_pipelined": r["pipelined"]["gpu_busy_fraction"], "gpu_busy_serial": r["serial"]["gpu_busy_fraction"],
            "target_gpu_busy_pipelined": 0.9,
        }
    result = {"device": device_name, "rows": rows, "plan": plan, "checks": checks}
    write_result(out, result)
    print(json.dumps(result))
    bad = [k for k, c in checks.items() if c["answers_equal"].split("/")[0] != c["answers_equal"].split("/")[1]]
    if bad:
        log(f"bench_jobs: pipelined answers differ from serial ones for answer length(s) {bad} (see checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
