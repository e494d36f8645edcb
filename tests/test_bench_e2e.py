"""apbv bench --level e2e on CPU: every stage timed, APB-V with a full passing budget gives dense's first token."""

from __future__ import annotations

import pytest
import torch
from distributed_utils import single_process_groups

from megatron_apbv.bench.e2e import STAGES, run_e2e
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.runtime.loading import load_config

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
