"""apbv infer, single process: the request file's checks, the answer file's recovery,
and the data-parallel world size."""

import io
import json
from pathlib import Path

import pytest

from megatron_apbv.jobs.answers import (
    AnswerWriter,
    recover_answers,
    summary_path,
    write_summary,
)
from megatron_apbv.jobs.requests import plan_requests, read_requests
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.models.resolve import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


def _requests(tmp_path, *lines: str) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"id": "x", "input.video_frames": 2', "line 2: not valid JSON"),
        ('["x"]', "line 2: a request must be a JSON object"),
        ('{"input.video_frames": 2}', "line 2: id: every request needs"),
        ('{"id": "a"}', "line 2: id: duplicate id 'a' (first on line 1)"),
        ('{"id": "x", "model.num_layers": 4}', "line 2: 'model.num_layers' is a job-level key"),
        ('{"id": "x", "parallel.context_parallel_size": 4}', "line 2: 'parallel.context_parallel_size' is a job-level"),
        ('{"id": "x", "apbv.variant": "exact"}', "line 2: 'apbv.variant' is a job-level key"),
        ('{"id": "x", "dtype": "bfloat16"}', "line 2: 'dtype' is a job-level key"),
        ('{"id": "x", "input.video_frame": 2}', "line 2: unknown key 'input.video_frame'; allowed keys of input"),
        ('{"id": "x", "output.path": 2}', "line 2: unknown key 'output.path'"),
    ],
)
def test_bad_request_line_names_line_and_field(tmp_path, bad, message):
    path = _requests(tmp_path, '{"id": "a", "input.video_frames": 2}', bad, '{"id": "z"}')
    with pytest.raises(ConfigError) as err:
        read_requests(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_request_config_is_job_config_plus_its_values(tmp_path):
    path = _requests(
        tmp_path,
        '{"id": "short", "input.video_frames": 2, "generate.max_new_tokens": 3, "seed": 7}',
        "",
        '{"id": "bad", "input.video_frames": -1}',
        '{"id": "long", "input.video_frames": 40}',
    )
    planned = plan_requests(read_requests(path), CONFIG, ["generate.max_new_tokens=5", "model.max_position_embeddings=1000"])
    short, bad, long = planned
    assert short.request.line == 1 and bad.request.line == 3
    assert all(p.error is None for p in planned)  # planning checks keys only; each config resolves when served
    (short_cfg, short_error), (bad_cfg, bad_error), (long_cfg, long_error) = (p.resolve() for p in planned)
    base = load_config(CONFIG, ["generate.max_new_tokens=5", "model.max_position_embeddings=1000"])
    assert short_error is None
    assert short_cfg.prompt_len == base.input.system_tokens + 2 * base.input.tokens_per_frame + base.input.query_tokens
    assert (short_cfg.generate.max_new_tokens, short_cfg.seed, short_cfg.apbv) == (3, 7, base.apbv)
    assert bad_cfg is None and "input.video_frames" in bad_error
    # 1476 prompt tokens: over the limit already (the config says so; with the 5 new tokens too)
    assert long_cfg is None and "model.max_position_embeddings=1000" in long_error


def test_planning_reads_no_video_and_a_missing_one_is_that_requests_error_when_served(tmp_path):
    missing = tmp_path / "gone.mp4"
    path = _requests(tmp_path, json.dumps({"id": "v", "input.kind": "video", "input.video_path": str(missing)}),
                     '{"id": "s"}')
    video, synthetic = plan_requests(read_requests(path), CONFIG, ["apbv.anchor=8"])
    assert video.error is None and video.kind == "video" and synthetic.kind == "synthetic"
    cfg, error = video.resolve()
    assert cfg is None and error.startswith("input.video_path: ") and str(missing) in error
    assert synthetic.resolve()[1] is None


def test_a_torn_tail_is_cut_off_and_a_duplicate_is_reported_and_kept(tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert recover_answers(out) == set()
    writer = AnswerWriter(out, "f" * 16)
    for rid in ("a", "b", "c"):
        writer.append({"id": rid, "generated_ids": [1, 2]})
    writer.close()
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 3 and all(line.endswith("\n") for line in lines)
    inode = out.stat().st_ino
    out.write_text(lines[0] + lines[1] + lines[0] + '{"id": "c", "generated_ids": [1,')  # duplicate + torn tail
    assert recover_answers(out) == {"a", "b"}
    err = capsys.readouterr().err
    assert "line 4 was torn" in err and "cut off" in err
    assert "1 line(s) ignored and left as they are (line 3 repeats id 'a' of line 1)" in err
    assert out.read_text() == lines[0] + lines[1] + lines[0]  # only the torn tail went, in place
    assert out.stat().st_ino == inode
    assert recover_answers(out) == {"a", "b"}  # idempotent
    assert "was torn" not in capsys.readouterr().err


def test_summary_sidecar_path_and_content(tmp_path):
    assert summary_path("x/answers.jsonl") == Path("x/answers.summary.json")
    assert summary_path("x/answers.out") == Path("x/answers.out.summary.json")
    path = write_summary(tmp_path / "a.jsonl", {"answered": 3})
    assert json.loads(path.read_text()) == {"answered": 3}


def test_world_size_allows_data_parallel_replicas():
    cfg = load_config(CONFIG)  # CP 2
    assert cfg.check_world_size(2) == 1 and cfg.check_world_size(6) == 3
    with pytest.raises(ConfigError, match="launched with 3 ranks but parallel.context_parallel_size=2"):
        cfg.check_world_size(3)
    pinned = load_config(CONFIG, ["parallel.data_parallel_size=2"])
    assert pinned.check_world_size(4) == 2
    with pytest.raises(ConfigError, match="parallel.data_parallel_size=2 x .* = 4"):
        pinned.check_world_size(6)


def test_bad_request_file_exits_2_before_any_process_group_or_model(tmp_path, monkeypatch, capsys):
    from megatron_apbv import cli
    from megatron_apbv.inference import engine
    from megatron_apbv.runtime import distributed

    def never(*args, **kwargs):
        raise AssertionError("reached process groups / model building")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "init_distributed", never)
    monkeypatch.setattr(engine.Engine, "build", never)
    path = _requests(tmp_path, '{"id": "a"}', '{"id": "b"}', '{"id": "c", "model.hidden_size": 8}')
    out = tmp_path / "answers.jsonl"
    code = cli.main(["infer", str(CONFIG), "--requests", str(path), "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "apbv: rank 1: " in err and "line 3: 'model.hidden_size' is a job-level key" in err
    assert not out.exists()


def test_single_prompt_commands_refuse_data_parallel(monkeypatch, capsys):
    from megatron_apbv import cli
    from megatron_apbv.runtime import distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "init_distributed", lambda *a: pytest.fail("reached process groups"))
    assert cli.main(["generate", str(CONFIG)]) == 2
    assert "apbv generate answers one prompt with one APB-V group, but 4 ranks make 2" in capsys.readouterr().err


def test_jobs_section_is_job_level_and_validated(tmp_path):
    cfg = load_config(CONFIG)
    assert (cfg.jobs.pipeline, cfg.jobs.batch_size, cfg.jobs.prefetch_depth, cfg.jobs.prefetch_workers) == (
        "pipelined", 8, 4, 2)
    for bad, field in (("jobs.batch_size=0", "batch_size"), ("jobs.prefetch_workers=0", "prefetch_workers"),
                       ("jobs.pipeline=fast", "pipeline"), ("jobs.prefetch_depth=-1", "prefetch_depth")):
        with pytest.raises(ConfigError, match=field):
            load_config(CONFIG, [bad])
    path = _requests(tmp_path, '{"id": "x", "jobs.batch_size": 2}')
    with pytest.raises(ConfigError, match="'jobs.batch_size' is a job-level key"):
        read_requests(path)


def test_gpu_busy_time_is_the_union_of_the_stage_intervals():
    from megatron_apbv.inference.stage_clock import StageClock, union_length

    assert union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4.0
    assert union_length([]) == 0.0
    import torch

    assert StageClock(torch.device("cpu"), sync_first=False).busy_fraction() is None  # no number on CPUs


def test_prefetch_turns_a_failed_decode_into_the_request_error_and_keeps_claim_order():
    from megatron_apbv.jobs.prefetch import Lookahead, prepare_request

    from megatron_apbv.jobs.requests import PlannedRequest, Request

    claims = iter([0, 1, 2, None])
    items = [PlannedRequest(Request(f"r{i}", i + 1, {}), {"seed": i}) for i in range(3)]

    def read(cfg):
        if cfg.seed == 1:
            raise ValueError("cannot read video 'b.mp4': broken")
        return f"prompt {cfg.seed}"

    ahead = Lookahead(lambda: next(claims), lambda i: prepare_request(i, items[i], read), depth=2, workers=2)
    got = [ahead.next() for _ in range(4)]
    ahead.close()
    assert [g.index for g in got[:3]] == [0, 1, 2] and got[3] is None
    assert got[0].prompt == "prompt 0" and got[0].error is None and got[0].cfg.seed == 0
    assert got[1].prompt is None and got[1].cfg is None and "broken" in got[1].error
    planned_error = PlannedRequest(Request("x", 9, {}), None, "planned error")
    assert prepare_request(5, planned_error, read).error == "planned error"
