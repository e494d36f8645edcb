"""apbv infer as processes (issue 31, defects 2, 4, 5): one job per output, poison requests, SIGTERM mid-request.

Real ranks only where the behaviour is about processes: two jobs on one output file,
poison requests surviving a resume on 2 gloo ranks, and a SIGTERM seen by one rank of
an APB-V group while it decodes. Bounds are far below ``parallel.timeout_seconds``
(600 s), so a hang cannot pass.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from distributed_utils import run_on_ranks
from rank_processes import CONFIG, STARTUP, collect, show, spawn

from megatron_apbv import cli
from megatron_apbv.runtime.outputs import lock_path

LONG = "parallel.timeout_seconds=600"
BOUND = STARTUP + 90


def _requests(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _ids(output: Path) -> list[str]:
    return [json.loads(line)["id"] for line in output.read_text().splitlines()]


def _infer_argv(requests: Path, output: Path, *extra: str) -> list[str]:
    return ["infer", CONFIG, "--requests", str(requests), "--output", str(output), "--quiet", LONG,
            "generate.max_new_tokens=2", *extra]


def test_two_jobs_on_one_output_the_second_fails_at_once_naming_the_first(tmp_path):
    requests = _requests(tmp_path / "requests.jsonl", [json.dumps({"id": f"r{i}"}) for i in range(20)])
    output = tmp_path / "answers.jsonl"
    argv = _infer_argv(requests, output, "parallel.context_parallel_size=1")
    job_a = spawn(1, lambda rank: argv)
    end = time.monotonic() + BOUND
    while time.monotonic() < end and job_a[0].poll() is None:  # A has claimed the output: freeze it there
        if lock_path(output).exists() and str(job_a[0].pid) in lock_path(output).read_text():
            os.killpg(job_a[0].pid, signal.SIGSTOP)
            break
        time.sleep(0.02)
    else:
        pytest.fail("job A never claimed its output:\n" + show(collect(job_a, 1)))
    try:
        answered_by_a = output.read_bytes() if output.exists() else b""
        started = time.monotonic()
        result_b = collect(spawn(1, lambda rank: argv), BOUND)
        rc, out, err = result_b[0]
        assert rc == 2, show(result_b)
        assert (f"apbv: rank 0: --output={str(output)!r} is in use by another apbv job (host {socket.gethostname()}, "
                f"pid {job_a[0].pid}, since ") in err, show(result_b)
        assert out == "" and "Traceback" not in err
        assert time.monotonic() - started < BOUND
        assert (output.read_bytes() if output.exists() else b"") == answered_by_a  # B wrote nothing
    finally:
        os.killpg(job_a[0].pid, signal.SIGCONT)
    result_a = collect(job_a, BOUND)
    assert result_a[0][0] == 0, show(result_a)
    assert sorted(_ids(output)) == sorted(f"r{i}" for i in range(20))  # every id once
    assert json.loads(result_a[0][1])["answered"] == 20
    # A ended: the same command again is a resume, not a conflict
    again = collect(spawn(1, lambda rank: argv), BOUND)
    assert again[0][0] == 0 and json.loads(again[0][1])["answered_before"] == 20, show(again)


def test_poison_requests_become_error_records_and_survive_a_resume_on_two_ranks(tmp_path):
    requests = _requests(tmp_path / "requests.jsonl", [
        '{"id": "p", "generate.temperature": 1e-310}',
        '{"id": "q", "seed": -9223372036854775809, "generate.temperature": 1}',
        '{"id": "long", "generate.max_new_tokens": 1000000}',
        '{"id": "ok", "generate.temperature": 1, "seed": 5}',
    ])
    output = tmp_path / "answers.jsonl"
    argv = _infer_argv(requests, output)
    for attempt in range(2):
        results = collect(spawn(2, lambda rank: argv), BOUND)
        assert [rc for rc, _, _ in results] == [0, 0], show(results)
        summary = json.loads(results[0][1])
        if attempt == 0:
            assert (summary["answered"], summary["errors"], summary["remaining"]) == (1, 3, 0), summary
        else:  # the resume: nothing runs again, nothing crashes
            assert (summary["answered_before"], summary["answered"], summary["errors"]) == (4, 0, 0), summary
    records = {json.loads(line)["id"]: json.loads(line) for line in output.read_text().splitlines()}
    assert sorted(records) == ["long", "ok", "p", "q"] and len(output.read_text().splitlines()) == 4
    assert "generate.temperature: 1e-310 is below 0.0001" in records["p"]["error"]
    assert "seed: Input should be greater than or equal to 0" in records["q"]["error"]
    assert "jobs.max_new_tokens_limit=4096" in records["long"]["error"]
    assert len(records["ok"]["generated_ids"]) == 2


def _stop_on_one_rank(rank, world):
    from megatron_apbv.inference.generate import apbv_generate
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    cfg = load_config(CONFIG, [f"parallel.context_parallel_size={world}", "generate.max_new_tokens=4000",
                               "generate.stop_at_eos=false"])
    init_distributed(cfg, LaunchEnv(rank, world, rank), torch.device("cpu"))
    asked = []

    def should_stop():  # SIGTERM reached rank 1 only, after its third question
        asked.append(1)
        return rank == 1 and len(asked) >= 3

    try:
        out = apbv_generate(cfg, torch.device("cpu"), should_stop=should_stop)
        return out["stopped_by_signal"], len(out["generated_ids"][0]), len(asked)
    finally:
        shutdown()


def test_a_stop_seen_by_one_rank_ends_the_groups_decoding_between_tokens():
    stopped, tokens, asked = run_on_ranks(2, _stop_on_one_rank)  # rank 0's view: it never saw the signal itself
    assert stopped and asked == 3
    assert tokens == 3 * 8  # stopped at step 24 (asked every 8 steps), not after 4000 tokens


def test_sigterm_mid_request_leaves_it_pending_and_the_job_exits_0(tmp_path, monkeypatch, capsys):
    from megatron_apbv.inference import decode_step

    requests = _requests(tmp_path / "requests.jsonl", ['{"id": "long", "generate.max_new_tokens": 4000}',
                                                       '{"id": "short"}'])
    output = tmp_path / "answers.jsonl"
    steps = []
    real_step = decode_step.DecodeRunner.step

    def step_then_sigterm(self):
        steps.append(1)
        if len(steps) == 10:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM's warning before preemption
        return real_step(self)

    monkeypatch.setattr(decode_step.DecodeRunner, "step", step_then_sigterm)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    # the serial pipeline ends the request in flight between tokens (the pipelined one finishes its sequences)
    code = cli.main(_infer_argv(requests, output, "parallel.context_parallel_size=1", "generate.stop_at_eos=false",
                                "jobs.pipeline=serial"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["stopped_by_signal"] and (summary["answered"], summary["remaining"]) == (0, 2), summary
    assert len(steps) < 20  # ended between tokens, at the next check (every 8 steps)
    assert output.read_text() == ""  # the stopped request is not an answer: a resume runs it
