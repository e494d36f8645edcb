"""End-to-end CPU launches of `apbv run` through the DeepSpeed launcher and torchrun.

Each test starts real gloo ranks on this machine via the scripts in launch/,
runs APB-V (exact variant) against the dense reference and checks the JSON
line rank 0 prints. Skipped (with the import error as reason) only while
megatron_apbv.cli cannot be imported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_utils import free_port

pytest.importorskip("megatron_apbv.cli", reason="megatron_apbv.cli (the apbv CLI) is not importable yet")

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIG = "configs/tiny_cpu.yaml"
TIMEOUT = 300

# Variables an outer launcher/scheduler may have set; the launch under test sets its own.
_STRIP = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
          "HOSTFILE", "NNODES", "RDZV_ENDPOINT", "APBV_MODULE", "CONFIG", "DRY_RUN", "PASS_LOCAL_RANK",
          "CUDA_VISIBLE_DEVICES", "LOCAL_SIZE"}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _STRIP and not k.startswith("SLURM_")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _result(proc: subprocess.CompletedProcess) -> dict:
    """The last stdout line that is a JSON object (launcher logs also go to stdout)."""
    assert proc.returncode == 0, f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise AssertionError(f"no JSON line on stdout:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")


def _check_exact(out: dict, world_size: int) -> None:
    assert out["world_size"] == world_size, out
    assert out["top1_agree"] is True, out
    assert out["max_abs_logit_diff"] <= 1e-4, out
    assert out.get("device", "cpu") == "cpu", out


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    # Own process group, so a timeout can stop the launcher *and* its ranks.
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launch timed out after {TIMEOUT}s\nSTDOUT:\n{out}\nSTDERR:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return _finish(_start(cmd, env))


@pytest.mark.parametrize("pass_local_rank", [False, True], ids=["no_local_rank", "with_local_rank_argv"])
def test_deepspeed_launcher_two_cpu_ranks(pass_local_rank):
    """`deepspeed --num_accelerators 2 --module megatron_apbv run ...`; the second case
    lets DeepSpeed insert `--local_rank=N` right after the module name."""
    env = _env(NPROC="2", MASTER_PORT=str(free_port()), PASS_LOCAL_RANK="1" if pass_local_rank else "0")
    proc = _run(["bash", str(LAUNCH / "deepspeed_cpu.sh"), CONFIG, "--compare", "dense", "apbv.variant=exact"], env)
    _check_exact(_result(proc), 2)


def test_torchrun_three_cpu_ranks():
    env = _env(NPROC_PER_NODE="3", MASTER_PORT=str(free_port()))
    proc = _run(["bash", str(LAUNCH / "torchrun.sh"), CONFIG, "parallel.context_parallel_size=3",
                 "apbv.variant=exact", "--compare", "dense"], env)
    _check_exact(_result(proc), 3)


def _two_deepspeed_nodes(hostfile, args: list[str], **extra: str) -> list[subprocess.CompletedProcess]:
    """Two DeepSpeed per-node launchers (``--no_ssh``, node ranks 0 and 1) of ``deepspeed_gpu.sh args``."""
    port = str(free_port())
    procs = []
    try:
        for node_rank in (0, 1):
            env = _env(HOSTFILE=str(hostfile), NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, DS_LOG_LEVEL="warning", DS_ACCELERATOR="cpu", **extra)
            procs.append(_start(["bash", str(LAUNCH / "deepspeed_gpu.sh"), *args], env))
        return [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def test_deepspeed_two_nodes_no_ssh_on_one_machine(tmp_path):
    """Two DeepSpeed per-node launchers (--no_ssh --node_rank 0/1) with one rank each:
    the APB-V group spans 'nodes'; ranks follow the hostfile order."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    results = _two_deepspeed_nodes(hostfile, [CONFIG, "apbv.variant=exact", "--compare", "dense"])
    _check_exact(_result(results[0]), 2)
    assert results[1].returncode == 0, results[1].stderr


def test_deepspeed_two_nodes_of_two_ranks_run_an_infer_job(tmp_path):
    """Two DeepSpeed per-node launchers (--no_ssh --node_rank 0/1, 2 slots each) run `apbv infer` as
    DP 2 x CP 2: the replicas span the two 'nodes' and every request is answered once."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": f"n{i}", "input.video_frames": 1 + 3 * i,
                                            "generate.max_new_tokens": 2}) + "\n" for i in range(4)))
    output = tmp_path / "answers.jsonl"
    results = _two_deepspeed_nodes(hostfile, [CONFIG, "--requests", str(requests), "--output", str(output),
                                              "device=cpu"], APBV_COMMAND="infer", OMP_NUM_THREADS="1")
    summary = _result(results[0])
    assert results[1].returncode == 0, results[1].stderr
    assert (summary["world_size"], summary["data_parallel_size"], summary["answered"]) == (4, 2, 4)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [f"n{i}" for i in range(4)]
