"""stdout of every command is JSON lines only (`apbv ... | jq` works), captured from real launches."""

import json
import os
import subprocess
import sys
from pathlib import Path

from distributed_utils import free_port

ROOT = Path(__file__).resolve().parents[1]

# Small settings of each command: one launch each, the whole test in well under a minute on 2 cores.
LAUNCHES = {
    "run": ["run", "configs/tiny_cpu.yaml", "--compare", "dense"],
    "generate": ["generate", "configs/tiny_cpu.yaml", "generate.max_new_tokens=2"],
    "bench": ["bench", "configs/bench_tiny_cpu.yaml", "--methods", "apbv", "--level", "layer",
              "--warmup", "0", "--repeat", "1"],
    "eval": ["eval", "configs/needle_demo.yaml", "--demo"],
}


def _json_lines(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    assert lines, "nothing on stdout"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"stdout line is not JSON: {line[:200]!r}") from None
    return records


def test_every_command_prints_only_json_lines():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name, args in LAUNCHES.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "megatron_apbv", *args, "device=cpu"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        records = _json_lines(proc.stdout)
        assert len(records) == 1, f"{name}: one record from rank 0, got {len(records)}"
    plan = subprocess.run([sys.executable, "-m", "megatron_apbv", "plan", "configs/qwen25vl_7b_lm.yaml", "--gpus", "8",
                           "--tokens", "131072"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert _json_lines(plan.stdout)[0]["command"] == "plan"
    assert "fastest" in plan.stderr  # the table is for people: stderr
