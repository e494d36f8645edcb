"""``apbv bench`` end to end on 2 CPU ranks through torchrun, and its pure helpers.

The launch times every method at two lengths and both levels; the JSONL must hold a
row per method x length x level, the PNG must be a PNG, and the ratios must agree
with the medians (dense is 1x dense, ring 1x ring).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_utils import free_port

from megatron_apbv.bench.benchmark import METHODS, add_arguments, method_config
from megatron_apbv.bench.report import LEVELS, format_table
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.models.resolve import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "bench_tiny_cpu.yaml"
TIMEOUT = 300
_STRIP = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
          "CUDA_VISIBLE_DEVICES"}


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise AssertionError(f"no JSON line on stdout:\n{stdout}")


def test_bench_two_cpu_ranks(tmp_path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k not in _STRIP}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "megatron_apbv", "bench", str(CONFIG),
        "--lengths", "256,512", "--repeat", "2", "--warmup", "1", "--out", str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    record = _last_json(proc.stdout)
    assert record["world_size"] == 2 and record["device"] == "cpu"
    assert all(json.loads(line) for line in proc.stdout.splitlines())  # stdout: the record only
    assert "median_ms" in proc.stderr and "apb_like" in proc.stderr  # the table is for people: stderr
    assert proc.stderr.count("median_ms  peak_GiB") == 1  # the table, printed by rank 0 only

    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    keys = {(r["method"], r["level"], r["length"]) for r in rows}
    assert keys == {(m, lv, n) for m in METHODS for lv in LEVELS for n in (256, 512)}
    assert len(rows) == len(keys) == len(record["rows"])
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and len(r["times_ms"]) == 2, r
        assert r["peak_mem_gib"] is None  # CPU
    by = {(r["method"], r["level"], r["length"]): r for r in rows}
    for r in rows:  # the record rounds ratios to 4 decimals: abs=5e-5 on top of rel
        dense, ring = by[("dense", r["level"], r["length"])], by[("ring", r["level"], r["length"])]
        assert r["speedup_vs_dense"] == pytest.approx(dense["median_ms"] / r["median_ms"], rel=1e-3, abs=5e-5)
        assert r["speedup_vs_ring"] == pytest.approx(ring["median_ms"] / r["median_ms"], rel=1e-3, abs=5e-5)
    for level in LEVELS:
        for n in (256, 512):
            assert by[("dense", level, n)]["speedup_vs_dense"] == 1.0
            assert by[("ring", level, n)]["speedup_vs_ring"] == 1.0
    # Ring and Ulysses are exact: the whole model gives the dense logits.
    for method in ("ring", "ulysses"):
        assert by[(method, "model", 512)]["logit_diff_vs_dense"] <= 1e-4

    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_method_config_resizes_the_prompt_and_sets_the_variant():
    cfg = load_config(CONFIG)
    for n in (100, 256, 513):
        for variant in (None, "star", "apb_like", "apbv"):
            c = method_config(cfg, n, variant)
            assert c.prompt_len == n and c.query_len == cfg.query_len
            assert c.model == cfg.model
    assert method_config(cfg, 512, "star").passing_lens() == (0, 0)
    assert not method_config(cfg, 512, "apb_like").apbv.setting("zigzag")
    assert method_config(cfg, 512, "apbv").passing_lens()[0] == 16  # passing: 1/32 of the prompt
    with pytest.raises(ConfigError, match="bench length 30"):
        method_config(cfg, 30)


def test_arguments_are_checked_before_launch():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--methods", "ring,apbv", "--lengths", "1024,2048"])
    assert args.methods == ("ring", "apbv") and args.lengths == (1024, 2048) and args.repeat == 5
    for bad in (["--methods", "ring,flash"], ["--lengths", "1k"], ["--repeat", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_table_marks_missing_values():
    row = {"method": "ulysses", "level": "layer", "length": 1024, "median_ms": None, "peak_mem_gib": None,
           "speedup_vs_dense": None, "speedup_vs_ring": None, "status": "skipped: heads"}
    table = format_table([row])
    assert "skipped: heads" in table and table.splitlines()[2].split()[3] == "-"
