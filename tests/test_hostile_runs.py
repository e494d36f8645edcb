"""Hostile runs (issue 20): bad inputs and faults end every rank fast, with one line each, and leave no files.

Multi-rank cases start real gloo ranks as plain processes (tests/rank_processes.py);
what fails before any collective is run in-process through ``cli.main`` as rank 0
and rank 1 of two. Bounds: every rank is gone far below ``parallel.timeout_seconds``
(set to 600 s here, so a hang cannot pass) plus the start-up allowance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_utils import free_port
from rank_processes import CONFIG, ROOT, STARTUP, clean_env, collect, show, spawn

from megatron_apbv import cli
from megatron_apbv.runtime.atomic import atomic_save_safetensors
from megatron_apbv.runtime.config import ConfigError
from fault_injection import FAULT_ENV
from megatron_apbv.runtime.numerics import (
    FiniteTracker,
    NonFiniteError,
    check_finite,
    non_finite_fields,
)

LONG = "parallel.timeout_seconds=600"  # a hang would show: every bound below is far shorter
BOUND = STARTUP + 60


def tiny_checkpoint(folder: Path, nan_in: str | None = None) -> Path:
    """A Qwen2 checkpoint with configs/tiny_cpu.yaml's shapes (random weights; ``nan_in`` gets one NaN)."""
    g = torch.Generator().manual_seed(0)
    h, f, v, kv = 64, 128, 256, 32
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    tensors = {name: torch.randn(shape, generator=g) * 0.1 for name, shape in shapes.items()}
    if nan_in:
        tensors[nan_in].view(-1)[3] = float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": h, "intermediate_size": f, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": v, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }))
    return folder


def _main_as_rank(monkeypatch, capsys, rank: int, argv: list[str]) -> tuple[int, str]:
    """``apbv ARGV`` in this process as rank ``rank`` of 2: (exit code, stderr)."""
    for key, value in {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}.items():
        monkeypatch.setenv(key, value)
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _one_line(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("apbv: ")]


# Bad input found before any collective: every rank says the same one line -----------------------------------


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "dup.yaml").write_text(Path(CONFIG).read_text() + "apbv:\n  window: 7\n")
    (tmp / "huge.yaml").write_text("k: 1\n" * 300_000)
    ckpt = tiny_checkpoint(tmp / "ckpt")
    (tmp / "list").mkdir()
    (tmp / "list" / "config.json").write_text("[1, 2]")
    return [
        ([str(tmp / "dup.yaml")], f"{tmp / 'dup.yaml'}: duplicate key 'apbv' at line 33 (first at line 15)"),
        (["apbv.window=true"], "apbv.window: got the boolean true where a number belongs"),
        (["parallel.timeout_seconds=9000000000"], "9000000000 s is above 2147483 s"),
        ([str(tmp / "huge.yaml")], "bytes is too large for a config file (at most 1048576 bytes)"),
        (["model.max_position_embeddings=400"], "is longer than model.max_position_embeddings=400"),
        (["generate.stop_ids=[-1]"], "generate.stop_ids.0: Input should be greater than or equal to 0"),
        ([f"model.checkpoint={tmp / 'list'}"], f"{str(tmp / 'list' / 'config.json')!r} holds a JSON list"),
        ([f"model.checkpoint={ckpt / 'model.safetensors'}"],
         "is a file, not a checkpoint directory: point model.checkpoint at the folder that holds config.json"),
    ]


def test_bad_input_before_any_collective_gives_one_line_on_every_rank(tmp_path, monkeypatch, capsys):
    for args, message in _cases(tmp_path):
        argv = ["run", *(args if args[0].endswith(".yaml") else [CONFIG, *args])]
        for rank in (0, 1):
            code, err = _main_as_rank(monkeypatch, capsys, rank, argv)
            lines = _one_line(err)
            assert code == 2, (argv, err)
            assert lines and lines[0].startswith(f"apbv: rank {rank}: ") and message in err, (argv, err)
            assert "Traceback" not in err


def _main_alone(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """``apbv ARGV`` in this process as a group of one (an in-memory store, no port)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    code = cli.main([*argv, "parallel.context_parallel_size=1"])
    return code, capsys.readouterr().err


def test_generation_beyond_the_position_limit_is_refused(monkeypatch, capsys):
    code, err = _main_alone(monkeypatch, capsys, ["generate", CONFIG, "model.max_position_embeddings=500",
                                                  "generate.max_new_tokens=100000"])
    assert code == 2, err
    assert ("apbv: rank 0: generate.max_new_tokens=100000 after the prompt of 468 tokens reaches position 100468, "
            "beyond model.max_position_embeddings=500: lower generate.max_new_tokens to at most 32") in err, err


# 1. Non-finite numbers ---------------------------------------------------------------------------------


def test_non_finite_logits_fail_every_rank_and_print_no_result():
    start = time.monotonic()
    procs = spawn(2, lambda rank: ["run", CONFIG, "model.init_std=3.0e38", "--compare", "dense", LONG])
    results = collect(procs, BOUND)
    assert time.monotonic() - start < BOUND
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 1, show(results)
        assert (f"apbv: rank {rank}: non-finite values (NaN or Inf) in the logits at the end of prefill on rank(s) "
                "0, 1: ") in err, show(results)
        assert out.strip() == "" and "Traceback" not in err, show(results)


def test_finite_checks_name_the_stage_and_the_step():
    check_finite(torch.ones(3), "x")
    with pytest.raises(NonFiniteError, match=r"non-finite values \(NaN or Inf\) in the prefill logits on rank"):
        check_finite(torch.tensor([1.0, float("inf")]), "the prefill logits")
    tracker = FiniteTracker(torch.device("cpu"))
    for step in range(6):
        tracker.update(torch.tensor([float("nan") if step in (3, 5) else 1.0]), step)
    with pytest.raises(NonFiniteError, match=r"in the logits of a decode step \(first at step 3\) on rank"):
        tracker.check("the logits of a decode step")
    assert non_finite_fields({"a": 1.0, "b": [0.5, float("nan")], "c": {"d": float("-inf")}}) == ["b.1", "c.d"]


def test_json_output_never_holds_nan(capsys):
    with pytest.raises(NonFiniteError, match=r"the result's max_abs_logit_diff is NaN or Infinity: not printed"):
        cli._emit({"next_token_id": 0, "max_abs_logit_diff": float("nan")}, sys.stdout)
    assert capsys.readouterr().out == ""


def test_a_nan_weight_is_named_at_load(tmp_path, monkeypatch, capsys):
    ckpt = tiny_checkpoint(tmp_path / "nan", nan_in="model.layers.1.mlp.up_proj.weight")
    code, err = _main_alone(monkeypatch, capsys, ["run", CONFIG, f"model.checkpoint={ckpt}"])
    assert code == 2, err
    assert (f"apbv: rank 0: checkpoint {str(ckpt)!r} holds non-finite values (NaN or Inf) in "
            "'model.layers.1.mlp.up_proj.weight' in model.safetensors: the weights are broken") in err, err


# 8. Corrupt checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_corrupt_safetensors_file_is_named_on_every_rank(tmp_path, damage):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    if damage == "random bytes":  # one rank run is enough to see the message; the truncated case runs two
        proc = subprocess.run([sys.executable, "-m", "megatron_apbv", "run", CONFIG, f"model.checkpoint={ckpt}",
                               "parallel.context_parallel_size=1"], capture_output=True, text=True, cwd=ROOT,
                              env=clean_env(), timeout=BOUND)
        results = [(proc.returncode, proc.stdout, proc.stderr)]
    else:
        results = collect(spawn(2, lambda rank: ["run", CONFIG, f"model.checkpoint={ckpt}", LONG]), BOUND)
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 2, show(results)
        assert f"apbv: rank {rank}: {str(weights)!r}" in err and ("is not a readable safetensors file" in err or
                                                                    "is the file truncated?" in err), show(results)
        assert "Traceback" not in err and out.strip() == "", show(results)


# 7. Output paths ----------------------------------------------------------------------------------------------


def test_an_unusable_bench_out_fails_every_rank_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    start = time.monotonic()
    results = collect(spawn(2, lambda rank: ["bench", CONFIG, "--out", str(blocker / "sub"), LONG]), BOUND)
    assert time.monotonic() - start < BOUND
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 2, show(results)
        assert (f"apbv: rank {rank}: --out={str(blocker / 'sub')!r}: {str(blocker)!r} is a file, not a directory"
                in err), show(results)
        assert "apbv bench" not in err  # no progress bar: nothing was timed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_eval_outputs_are_checked_first_and_never_share_a_path(tmp_path):
    from megatron_apbv.eval.evaluate import output_paths, write_outputs

    with pytest.raises(ConfigError) as err:
        output_paths(str(tmp_path / "res.png"))
    assert str(err.value) == (
        f"the result JSON and the plot would both be written to {str(tmp_path / 'res.png')!r}: give --out a .json "
        f"path (e.g. {str(tmp_path / 'res.json')!r}); the plot goes beside it"
    )
    (tmp_path / "res.png").mkdir()
    with pytest.raises(ConfigError, match=r"--out \(its .png plot\)=.*res.png' is a directory: give a file path"):
        output_paths(str(tmp_path / "res.json"))
    with pytest.raises(ConfigError, match=r"--out='/proc/apbv/res.json': cannot write in '/proc'"):
        output_paths("/proc/apbv/res.json")
    with pytest.raises(ConfigError, match=r"--out=.* is a directory"):
        output_paths(str(tmp_path))
    # The plot failing after the JSON was written: the command leaves neither.
    with pytest.raises(Exception):
        write_outputs({"settings": "not a list of settings"}, tmp_path / "r.json", tmp_path / "r.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.png"]
    record = {"settings": [], "dense": {"accuracy": 0.5}, "world_size": 2, "prompt_tokens": 10, "examples": 1}
    write_outputs(record, *output_paths(str(tmp_path / "ok" / "r.json")))
    assert json.loads((tmp_path / "ok" / "r.json").read_text()) == record
    assert (tmp_path / "ok" / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["r.json", "r.png"]  # no temp files


# 6. Ctrl-C ----------------------------------------------------------------------------------------------------


def test_ctrl_c_gives_one_line_per_rank_and_exit_130():
    procs = spawn(2, lambda rank: ["run", CONFIG, LONG], lambda rank: {FAULT_ENV: "rank=1,layer=1,action=hang"})
    # Wait until rank 1 sits in its hang (rank 0 then waits for it inside a collective), then Ctrl-C both,
    # as a terminal does (the whole foreground group gets SIGINT).
    deadline = time.monotonic() + BOUND
    lines = []
    while time.monotonic() < deadline and not any("hang at layer 1" in line for line in lines):
        lines.append(procs[1].stderr.readline())
    assert any("hang at layer 1" in line for line in lines), "".join(lines)
    start = time.monotonic()
    for proc in procs:
        os.killpg(proc.pid, signal.SIGINT)
    results = collect(procs, 60)
    assert time.monotonic() - start < 60
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 130, show(results)
        assert _one_line(err) == [f"apbv: rank {rank}: interrupted"] or (
            rank == 1 and _one_line(err)[-1] == "apbv: rank 1: interrupted"), show(results)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err and out.strip() == "", show(results)


# 5. Two jobs on one port ----------------------------------------------------------------------------------------


def _job(port: int, log: Path) -> subprocess.Popen:
    """Two ranks started by one parent process, as a launcher starts them (rank r logs to log.r)."""
    rank = [f"RANK={r} LOCAL_RANK={r} {sys.executable} -m megatron_apbv run {CONFIG} {LONG} >{log}.{r}.out "
            f"2>{log}.{r}.err" for r in (0, 1)]
    script = f"export WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT={port}; {rank[0]} & {rank[1]} & wait"
    return subprocess.Popen(["bash", "-c", script], env=clean_env(), cwd=ROOT, start_new_session=True)


def test_two_jobs_on_one_port_the_loser_fails_fast_and_nobody_hangs(tmp_path):
    port = free_port()
    start = time.monotonic()
    jobs = [_job(port, tmp_path / "a"), _job(port, tmp_path / "b")]
    for job in jobs:
        try:
            job.wait(timeout=max(1, BOUND + 60 - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for j in jobs:
                os.killpg(j.pid, signal.SIGKILL)
    assert time.monotonic() - start < BOUND + 60, "a job hung"
    logs = {(job, r): ((tmp_path / f"{job}.{r}.out").read_text(), (tmp_path / f"{job}.{r}.err").read_text())
            for job in "ab" for r in (0, 1)}
    shown = "\n".join(f"--- {k}: {err[-800:]}" for k, (_, err) in logs.items())
    winners = [job for job in "ab" if '"next_token_id"' in logs[(job, 0)][0]]
    assert len(winners) == 1, shown
    loser = "b" if winners == ["a"] else "a"
    assert "Traceback" not in logs[(loser, 0)][1] + logs[(loser, 1)][1], shown
    assert (f"apbv: rank 0: MASTER_PORT={port} on 127.0.0.1 is already in use (another job?): give this job a free "
            "port (MASTER_PORT=...") in logs[(loser, 0)][1], shown
    assert f"apbv: rank 1: the store on MASTER_PORT={port} belongs to another job" in logs[(loser, 1)][1], shown
