"""apbv bench --level e2e on CPU: every stage timed, APB-V with a full passing budget gives dense's first token."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_utils import single_process_groups

from megatron_apbv.bench.e2e import STAGES, run_e2e
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.models.resolve import load_config
from megatron_apbv.runtime.outputs import OutputLock

TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "model.vocab_size=256", "model.mrope_section=[2,3,3]", "dtype=float32",
    "device=cpu", "vision.depth=2", "vision.hidden_size=32", "vision.num_heads=2", "vision.intermediate_size=64",
    "vision.fullatt_block_indexes=[1]", "input.video_frames=4", "input.frame_size=[56,84]", "input.system_tokens=8",
    "input.query_tokens=5", "apbv.anchor=16", "apbv.passing=1.0",
]


@pytest.fixture(scope="module")
def megatron_single():
    with single_process_groups():
        yield


def test_e2e_level_times_every_stage_and_predicts_scaling(tmp_path, megatron_single):
    cfg = load_config("configs/qwen25vl_3b_e2e.yaml", TINY)
    rec = run_e2e(cfg, torch.device("cpu"), source_size=(60, 90), warmup=0, repeat=1, out=str(tmp_path))
    assert rec["video_tokens"] == 2 * (56 // 28) * (84 // 28)
    for method in ("dense", "apbv"):
        stages = rec["methods"][method]["stages_s"]
        assert rec["vision_flop"] > 0 and rec["methods"][method]["vision_tflops_per_s"] is not None
        assert set(stages) == set(STAGES) and all(s > 0 for s in stages.values())
    # passing = the whole block: APB-V is exact at W = 1, so the first token is dense's
    assert rec["methods"]["apbv"]["first_token_id"] == rec["methods"]["dense"]["first_token_id"]
    for w in ("2", "4", "8"):
        pred = rec["predicted"][w]
        assert pred["limiting_stage"] in STAGES
        assert pred["stages_s"]["vision"] < rec["methods"]["apbv"]["stages_s"]["vision"]
    assert (tmp_path / "e2e.jsonl").exists()


def test_e2e_level_needs_one_gpu_and_video():
    cfg = load_config("configs/qwen25vl_3b_e2e.yaml", TINY + ["parallel.context_parallel_size=2"])
    with pytest.raises(ConfigError, match="one GPU"):
        run_e2e(cfg, torch.device("cpu"))


def test_e2e_bench_and_the_job_run_the_same_stage_code(tmp_path, megatron_single, monkeypatch):
    """Every stage of `apbv bench --level e2e` and of `apbv infer` (both pipelines) goes through the same
    Engine methods, on the same tower: a bench that timed its own copy of a stage would fail here."""
    import argparse

    from megatron_apbv.inference import engine as engine_module
    from megatron_apbv.jobs.infer import _run_job
    from megatron_apbv.jobs.requests import plan_requests, read_requests
    from megatron_apbv.models.video import synthetic_video, write_video
    from megatron_apbv.runtime.distributed import LaunchEnv

    calls: dict[str, set] = {}
    current = {"who": None}
    Engine = engine_module.Engine

    def spy(name, original, static=False):
        def wrapper(*args, **kwargs):
            calls.setdefault(current["who"], set()).add(name)
            return original(*args, **kwargs)
        return staticmethod(wrapper) if static else wrapper

    for name in ("embed", "prefill", "decode_runner"):
        monkeypatch.setattr(Engine, name, spy(name, getattr(Engine, name)))
    monkeypatch.setattr(Engine, "read_prompt", spy("read_prompt", Engine.read_prompt, static=True))
    towers = {}
    build = engine_module.build_vision_tower_for

    def tower_spy(cfg, device):
        tower = build(cfg, device)
        towers[current["who"]] = sorted({type(m).__name__ for m in tower.modules()})
        return tower

    monkeypatch.setattr(engine_module, "build_vision_tower_for", tower_spy)

    current["who"] = "bench"
    cfg = load_config("configs/qwen25vl_3b_e2e.yaml", TINY)
    run_e2e(cfg, torch.device("cpu"), source_size=(60, 90), warmup=0, repeat=1, out=str(tmp_path / "bench"))

    video = tmp_path / "clip.mp4"
    write_video(video, synthetic_video(8, 60, 90, seed=3))
    requests = tmp_path / "requests.jsonl"
    requests.write_text(f'{{"id": "a", "input.video_path": "{video}"}}\n{{"id": "b"}}\n')
    overrides = TINY + ["generate.max_new_tokens=2", "input.kind=video"]
    for mode in ("serial", "pipelined"):
        current["who"] = mode
        output = tmp_path / f"{mode}.jsonl"
        args = argparse.Namespace(prepared=plan_requests(read_requests(requests), "configs/qwen25vl_3b_e2e.yaml",
                                                         overrides),
                                  output=str(output), quiet=True, pipeline=mode, store=dist.HashStore(),
                                  output_claim=OutputLock.acquire(output, "--output"))  # what prepare() takes
        try:
            summary = _run_job(args, load_config("configs/qwen25vl_3b_e2e.yaml", overrides), LaunchEnv(0, 1, 0),
                               torch.device("cpu"), {"signal": False})
        finally:
            args.output_claim.release()
        assert (summary["answered"], summary["errors"], summary["pipeline"]) == (2, 0, mode)
        assert summary["gpu_busy_fraction"] is None  # a CPU run has no separate device to be busy
    prefill_stages = {"read_prompt", "embed", "prefill"}
    assert calls["bench"] == prefill_stages
    assert calls["serial"] == calls["pipelined"] == prefill_stages | {"decode_runner"}
    assert towers["bench"] == towers["serial"] == towers["pipelined"]
    assert "VisionTower" in towers["bench"]  # ours (models/vision_tower.py), not transformers' tower


def test_e2e_level_is_a_client_of_the_engine_not_of_the_bench():
    # benchmark.py dispatches --level e2e to e2e.py; an import back would close a circle
    import ast
    from pathlib import Path

    import megatron_apbv.bench.e2e as e2e

    tree = ast.parse(Path(e2e.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "megatron_apbv.inference.engine" in imported
    assert not {m for m in imported if m and m.startswith("megatron_apbv.bench")}, imported
