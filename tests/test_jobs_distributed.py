"""apbv infer on real gloo ranks: DP 2 x CP 2 answers of both pipelines equal dense generation (stop ids,
different lengths, a video that fails to decode in the prefetch workers), resume after a killed rank and a
torn line, SIGTERM with several sequences in flight then resume. Ranks are started directly with
RANK/WORLD_SIZE (as srun does)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_utils import free_port, run_on_ranks
from rank_processes import FAULTY_ENTRY

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
TIMEOUT = 300
EXACT = ["apbv.variant=exact", "model.init_std=0.3"]  # init_std: the model does not repeat one token


def _start_ranks(world, requests, output, *overrides, env_extra=None):
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", **(env_extra or {})}
        # APBV_FAULT_INJECT is read only by the test-only entry point (tests/apbv_with_faults.py)
        entry = [FAULTY_ENTRY] if "APBV_FAULT_INJECT" in (env_extra or {}) else ["-m", "megatron_apbv"]
        cmd = [sys.executable, *entry, "infer", str(CONFIG), "--requests", str(requests),
               "--output", str(output), "parallel.timeout_seconds=60", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs):
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("apbv infer timed out")
        results.append((p.returncode, out, err))
    return results


def _records(output):
    lines = Path(output).read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    return [json.loads(line) for line in lines]


def _write_requests(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# Different lengths (video frames, system tokens) and decode lengths; one missing video in the middle
# (an error of the planning) and one that probes but fails to decode (an error inside the prefetch workers).
REQUESTS = [
    {"id": "r0", "input.video_frames": 2, "generate.max_new_tokens": 4},
    {"id": "r1", "input.video_frames": 9, "input.system_tokens": 5, "generate.max_new_tokens": 3},
    {"id": "r2", "input.video_frames": 4, "generate.max_new_tokens": 5},
    {"id": "missing", "input.kind": "video", "input.video_path": "no/such/video.mp4", "input.video_frames": 20},
    {"id": "r3", "input.video_frames": 6, "input.system_tokens": 30, "generate.max_new_tokens": 2},
    {"id": "r4", "input.video_frames": 1, "generate.max_new_tokens": 4},
    {"id": "r5", "input.video_frames": 12, "generate.max_new_tokens": 3},
    {"id": "r6", "input.video_frames": 3, "input.system_tokens": 11, "generate.max_new_tokens": 9},
    {"id": "r7", "input.video_frames": 7, "generate.max_new_tokens": 1},
    {"id": "r8", "input.video_frames": 5, "input.system_tokens": 9, "generate.max_new_tokens": 7},
    {"id": "r9", "input.video_frames": 10, "generate.max_new_tokens": 6},
]
# A small vision tower, built because one request is a real video (it never gets past its decode).
TINY_VISION = ["vision.depth=1", "vision.hidden_size=16", "vision.num_heads=2", "vision.intermediate_size=32",
               "vision.fullatt_block_indexes=[0]"]


def _corrupt_video(path):
    """An mp4 whose container probes fine (frame count, rate, size) but whose frames 4-7 do not decode."""
    import av

    from megatron_apbv.models.video import synthetic_video, write_video

    write_video(path, synthetic_video(16, 56, 56, seed=0), fps=8, gop=4)
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    for pos, size in packets[4:8]:
        data[pos : pos + size] = b"\xff" * size
    path.write_bytes(bytes(data))
    return path


def _dense_answers(rank, world, rows):
    """Greedy decoding of every request by re-running the dense model over the growing sequence (one process),
    up to and including a stop id."""
    from megatron_apbv.models.gpt import build_gpt_model, build_rope, last_token_logits
    from megatron_apbv.models.inputs import build_prompt
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config
    from megatron_apbv.runtime.loading import dotted_tree

    base = load_config(CONFIG, EXACT + ["parallel.context_parallel_size=1"])
    init_distributed(base, LaunchEnv(0, 1, 0), torch.device("cpu"))
    model = build_gpt_model(base, method="dense", device=torch.device("cpu"))
    rope = build_rope(base, torch.device("cpu"))
    answers = {}
    for row in rows:
        values = {k: v for k, v in row.items() if k != "id"}
        cfg = load_config(CONFIG, EXACT + ["parallel.context_parallel_size=1"], dotted_tree(values))
        prompt = build_prompt(cfg)
        ids, pos, out = prompt.input_ids, prompt.position_ids, []
        for _ in range(cfg.generate.max_new_tokens):
            token = last_token_logits(model, rope, ids, pos).argmax(-1)
            out.append(int(token[0]))
            if out[-1] in cfg.generate.stop_ids:
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
        answers[row["id"]] = (out, cfg.prompt_len)
    shutdown()
    return answers


def test_dp2_cp2_both_pipelines_equal_dense_and_failed_decodes_are_one_error_each(tmp_path):
    plain = [row for row in REQUESTS if row["id"] != "missing"]
    free = run_on_ranks(1, _dense_answers, plain)
    # stop ids taken from the free-running answers, so that they do stop some requests early
    rows = [dict(row) for row in REQUESTS]
    for row in rows:
        ids = free.get(row["id"], ([], 0))[0]
        if row["id"] in ("r2", "r6", "r8") and len(ids) > 2:
            row["generate.stop_ids"] = [ids[1]]
    rows.insert(6, {"id": "undecodable", "input.kind": "video",
                    "input.video_path": str(_corrupt_video(tmp_path / "bad.mp4")),
                    "input.video_frames": 8, "input.frame_size": [56, 56]})
    requests = _write_requests(tmp_path / "requests.jsonl", rows)
    dense = run_on_ranks(1, _dense_answers, [row for row in rows if row["id"] in free])
    assert any(len(dense[r][0]) < len(free[r][0]) for r in ("r2", "r6", "r8"))  # a stop id cut an answer
    assert len({tuple(ids) for ids, _ in dense.values()}) == len(dense)  # distinct answers: a meaningful check
    outputs = {}
    for mode, extra in (("pipelined", ["jobs.batch_size=3", "jobs.prefetch_depth=2"]), ("serial", [])):
        output = tmp_path / f"{mode}.jsonl"
        results = _finish(_start_ranks(4, requests, output, *EXACT, *TINY_VISION, *extra, "--pipeline", mode))
        for code, out, err in results:
            assert code == 0, err[-3000:]
        records = {r["id"]: r for r in _records(output)}
        assert sorted(records) == sorted(row["id"] for row in rows)
        assert set(records["missing"]) == {"id", "error", "replica", "fingerprint"}
        assert "no such file" in records["missing"]["error"]
        assert set(records["undecodable"]) == {"id", "error", "replica", "fingerprint"}
        assert "cannot read video" in records["undecodable"]["error"]
        for rid, (ids, prompt_len) in dense.items():
            assert records[rid]["generated_ids"] == ids, (mode, rid)
            assert records[rid]["prompt_tokens"] == prompt_len
            assert set(records[rid]["seconds"]) == {"video_decode", "vision", "prefill", "decode"}
        assert {r["replica"] for r in records.values()} == {0, 1}  # both replicas took work
        summary = json.loads(results[0][1].strip().splitlines()[-1])
        assert (summary["answered"], summary["errors"], summary["remaining"]) == (len(dense), 2, 0)
        assert summary["pipeline"] == mode and summary["batch_size"] == (3 if mode == "pipelined" else 1)
        assert summary["gpu_busy_fraction"] is None  # CPU ranks: no number rather than a made-up one
        assert summary["generated_tokens_per_second"] > 0 and set(summary["stage_seconds"]) == set(
            records["r0"]["seconds"])
        assert summary["data_parallel_size"] == 2 and results[1][1] == ""  # only rank 0 prints
        assert json.loads((tmp_path / f"{mode}.summary.json").read_text()) == summary
        outputs[mode] = records
    for rid in dense:
        assert outputs["pipelined"][rid]["generated_ids"] == outputs["serial"][rid]["generated_ids"]


def test_killed_rank_then_resume_answers_every_id_once(tmp_path):
    """DP 2 x CP 1: rank 1 (replica 1) dies in its first request; replica 0 answers the rest, the job
    fails; a torn line for the lost request is appended by hand; the rerun drops it and answers it."""
    rows = [{"id": f"q{i}", "input.video_frames": 1 + i % 5, "generate.max_new_tokens": 2} for i in range(12)]
    requests = _write_requests(tmp_path / "requests.jsonl", rows)
    output = tmp_path / "answers.jsonl"
    # few slots and little claiming ahead: replica 0 must not take every request before replica 1 starts
    small = ["jobs.batch_size=2", "jobs.prefetch_depth=1"]
    first = _finish(_start_ranks(2, requests, output, "parallel.context_parallel_size=1", *small,
                                 env_extra={"APBV_FAULT_INJECT": "rank=1,layer=1,action=kill"}))
    assert first[0][0] != 0 and first[1][0] == -signal.SIGKILL
    assert "collective failed" in first[0][2]
    done = [r["id"] for r in _records(output)]
    lost = sorted({r["id"] for r in rows} - set(done))
    assert len(done) == len(set(done)) and lost  # the killed replica's request is missing
    with output.open("a") as f:
        f.write(json.dumps({"id": lost[0], "replica": 1, "generated_ids": [1, 2]})[:25])  # a torn last line
    second = _finish(_start_ranks(2, requests, output, "parallel.context_parallel_size=1", *small))
    assert [code for code, _, _ in second] == [0, 0], second[0][2][-3000:]
    assert "was torn (no end of line: a killed job's last write): cut off" in second[0][2]
    ids = [r["id"] for r in _records(output)]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every id exactly once
    summary = json.loads(second[0][1].strip().splitlines()[-1])
    assert (summary["answered_before"], summary["answered"]) == (len(done), len(lost))


def test_sigterm_finishes_sequences_in_flight_exits_0_and_resume_redoes_the_rest(tmp_path):
    rows = [{"id": f"t{i}", "input.video_frames": 2 + i % 5, "generate.max_new_tokens": 6 + i % 7}
            for i in range(80)]
    requests = _write_requests(tmp_path / "requests.jsonl", rows)
    output = tmp_path / "answers.jsonl"
    batching = ["parallel.context_parallel_size=1", "jobs.batch_size=4"]
    procs = _start_ranks(2, requests, output, *batching)
    deadline = time.monotonic() + TIMEOUT
    while (not output.exists() or len(output.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a rank exited early"
        time.sleep(0.05)
    for p in procs:  # what srun does at preemption: SIGTERM to every task
        p.send_signal(signal.SIGTERM)
    results = _finish(procs)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:]
    records = _records(output)  # whole lines only
    summary = json.loads(results[0][1].strip().splitlines()[-1])
    assert summary["stopped_by_signal"] is True
    assert summary["answered"] == len(records) and summary["remaining"] == len(rows) - len(records) > 0
    assert len({r["id"] for r in records}) == len(records)
    in_flight = [int(line.split("finishing the ")[1].split()[0])
                 for code, out, err in results for line in err.splitlines() if "SIGTERM: finishing" in line]
    assert len(in_flight) == 2 and max(in_flight) >= 2  # both replicas stopped, with several sequences decoding
    second = _finish(_start_ranks(2, requests, output, *batching))
    assert [code for code, _, _ in second] == [0, 0], second[0][2][-3000:]
    ids = [r["id"] for r in _records(output)]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every id exactly once
    summary = json.loads(second[0][1].strip().splitlines()[-1])
    assert (summary["answered_before"], summary["answered"]) == (len(records), len(rows) - len(records))
