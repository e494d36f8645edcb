"""Honest resume: every answer record carries the job's fingerprint (the settings that change answers); a
rerun on the same --output with the same settings answers only the missing ids, one with another setting is
refused on every rank naming --overwrite, and --overwrite answers every request again (2 gloo ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rank_processes import STARTUP, collect, show, spawn

from megatron_apbv.jobs.fingerprint import job_fingerprint
from megatron_apbv.models.resolve import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
JOB = ["apbv.variant=exact", "model.init_std=0.3", "generate.max_new_tokens=3", "parallel.timeout_seconds=60"]


@pytest.mark.parametrize("override", [
    "apbv.variant=star", "generate.max_new_tokens=4", "dtype=bfloat16", "seed=5", "model.num_layers=3",
    "input.video_frames=10", "parallel.context_parallel_size=1", "generate.temperature=0.5",
])
def test_a_setting_that_changes_answers_changes_the_fingerprint(override):
    assert job_fingerprint(load_config(CONFIG, JOB + [override])) != job_fingerprint(load_config(CONFIG, JOB))


def test_another_passing_budget_changes_the_fingerprint():
    apbv = JOB + ["apbv.variant=apbv"]
    assert job_fingerprint(load_config(CONFIG, apbv + ["apbv.passing=16"])) != job_fingerprint(
        load_config(CONFIG, apbv + ["apbv.passing=8"]))


@pytest.mark.parametrize("override", [
    "jobs.batch_size=2", "jobs.pipeline=serial", "jobs.progress_seconds=1", "parallel.timeout_seconds=30",
    "parallel.data_parallel_size=1", "jobs.prefetch_workers=1", "parallel.backend=gloo", "device=cpu",
])
def test_where_and_how_the_job_runs_leaves_the_fingerprint(override):
    assert job_fingerprint(load_config(CONFIG, JOB + [override])) == job_fingerprint(load_config(CONFIG, JOB))


def test_the_checkpoint_is_named_by_its_folder_and_files(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, size in ((one, 4), (two, 5)):
        folder.mkdir()
        (folder / "generation_config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x" * size)
    relative = load_config(CONFIG, JOB + [f"model.tokenizer={one}"])
    assert job_fingerprint(relative) == job_fingerprint(load_config(CONFIG, JOB + [f"model.tokenizer={one}/."]))
    assert job_fingerprint(relative) != job_fingerprint(load_config(CONFIG, JOB + [f"model.tokenizer={two}"]))


def _infer(requests, output, *extra, expect=0):
    procs = spawn(2, lambda rank: ["infer", CONFIG, "--requests", str(requests), "--output", str(output),
                                   *JOB, *extra])
    results = collect(procs, STARTUP + 120)
    assert all(rc == expect for rc, _, _ in results), show(results)
    summary = json.loads(results[0][1].strip().splitlines()[-1]) if expect == 0 else None
    return summary, [err for _, _, err in results]


def _records(output):
    return [json.loads(line) for line in Path(output).read_text().splitlines()]


def test_resume_is_keyed_by_the_fingerprint_and_overwrite_starts_afresh(tmp_path):
    rows = [{"id": "a", "input.video_frames": 2}, {"id": "b", "input.video_frames": 3},
            {"id": "c", "input.video_frames": 4}]
    first, every = tmp_path / "first.jsonl", tmp_path / "every.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    every.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "answers.jsonl"
    fingerprint = job_fingerprint(load_config(CONFIG, JOB))

    summary, _ = _infer(first, output)
    assert (summary["answered"], summary["fingerprint"]) == (2, fingerprint)
    summary, _ = _infer(every, output)  # same settings: only the missing id
    assert (summary["answered_before"], summary["answered"], summary["errors"]) == (2, 1, 0)
    records = _records(output)
    assert [r["id"] for r in records] == ["a", "b", "c"] and {r["fingerprint"] for r in records} == {fingerprint}

    before = output.read_bytes()
    for changed in ("apbv.variant=star", "generate.max_new_tokens=2"):
        _, errs = _infer(every, output, changed, expect=2)
        for err in errs:  # every rank says it, before any collective (exit 2: a config error)
            assert "holds answers made with other settings" in err and "--overwrite" in err, err
            assert fingerprint in err
    assert output.read_bytes() == before  # refused: nothing written

    summary, _ = _infer(every, output, "apbv.variant=star", "--overwrite")
    star = job_fingerprint(load_config(CONFIG, JOB + ["apbv.variant=star"]))
    assert (summary["answered_before"], summary["answered"], summary["overwrite"]) == (0, 3, True)
    records = _records(output)
    assert sorted(r["id"] for r in records) == ["a", "b", "c"] and {r["fingerprint"] for r in records} == {star}
    summary, _ = _infer(every, output, "apbv.variant=star")  # and the replaced file resumes under its settings
    assert (summary["answered_before"], summary["answered"]) == (3, 0)
