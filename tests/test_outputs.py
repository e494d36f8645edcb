"""Outputs that never destroy (issue 31, defects 1-3, 9): runtime/outputs.py, runtime/atomic.py, jobs/answers.py.

Special files are only ever ``stat``-ed: the tests make ``os.open``/``mkstemp`` fail loudly
if they are reached for a device or a FIFO, so a refusal that came too late cannot pass
(and nothing is ever written to a real device). ``apbv infer`` runs in this process as a
group of one (tests/test_hostile_runs.py's ``_main_alone``) on the tiny CPU model.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
from rank_processes import CONFIG

from megatron_apbv import cli
from megatron_apbv.jobs.answers import (
    AnswerWriter,
    check_answer_outputs,
    recover_answers,
    summary_path,
)
from megatron_apbv.runtime.atomic import atomic_write_text
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.runtime.outputs import OutputError, OutputLock, check_output_path, lock_path

DEVICES = [p for p in ("/dev/null", "/dev/full", "/dev/zero") if os.path.exists(p)]


@pytest.fixture
def no_open_of(monkeypatch):
    """``no_open_of(path)``: any os.open / mkstemp touching ``path`` (or its folder, for mkstemp) fails the test."""
    forbidden: list[str] = []
    real_open, real_mkstemp = os.open, tempfile.mkstemp

    def guarded_open(path, *args, **kwargs):
        assert os.path.realpath(path) not in forbidden, f"os.open({path!r}) reached"
        return real_open(path, *args, **kwargs)

    def guarded_mkstemp(*args, dir=None, **kwargs):
        assert dir is None or os.path.realpath(dir) not in forbidden, f"mkstemp in {dir!r} reached"
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(tempfile, "mkstemp", guarded_mkstemp)
    return lambda *paths: forbidden.extend(os.path.realpath(p) for p in paths)


# 1. Special files are refused from stat alone --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_output_is_refused_before_any_open(device, no_open_of):
    no_open_of(device, os.path.dirname(device))
    with pytest.raises(ConfigError, match=rf"--out={device!r} is a character device, not a regular file"):
        check_output_path(device, "--out")
    with pytest.raises(ConfigError, match="is a character device, not a regular file"):
        atomic_write_text(device, "{}\n")  # the last line of defence: no temp file, no rename over it


def test_a_fifo_output_is_refused_without_blocking(tmp_path, no_open_of):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    no_open_of(fifo)
    with pytest.raises(ConfigError, match=r"is a FIFO \(named pipe\), not a regular file"):
        check_output_path(fifo, "--out")
    with pytest.raises(ConfigError, match=r"FIFO"):
        check_answer_outputs(fifo, tmp_path / "requests.jsonl")
    with pytest.raises(ConfigError, match=r"FIFO"):
        recover_answers(fifo)
    with pytest.raises(ConfigError, match=r"FIFO"):
        AnswerWriter(fifo, "f" * 16)


def test_a_symlinked_output_is_written_through_to_its_target(tmp_path):
    target = tmp_path / "real" / "answers.jsonl"
    target.parent.mkdir()
    record = '{"id":"a","generated_ids":[1]}\n'
    target.write_text(record + '{"id":"b","generated_ids":[1')  # a torn last line
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert check_answer_outputs(link, tmp_path / "requests.jsonl") == target
    assert recover_answers(link) == {"a"}
    assert link.is_symlink() and target.read_text() == record  # cut off in the target, the link kept
    atomic_write_text(tmp_path / "link.jsonl", record * 2)
    assert link.is_symlink() and target.read_text() == record * 2


def test_files_that_are_not_ours_are_refused_and_kept(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(Path(CONFIG).read_text())
    before = config.read_bytes()
    with pytest.raises(ConfigError, match=r"--output='.*config.yaml' exists and is not an answer file of apbv infer"):
        check_answer_outputs(config, tmp_path / "requests.jsonl")
    with pytest.raises(ConfigError, match=r"exists and is not an answer file"):
        recover_answers(config)
    with pytest.raises(ConfigError, match=r"--out='.*config.yaml' exists and is not a JSON file"):
        check_output_path(config, "--out")
    fake_png = tmp_path / "plot.png"
    fake_png.write_text("notes")
    with pytest.raises(ConfigError, match=r"exists and is not a PNG image"):
        check_output_path(fake_png, "--out (its .png plot)")
    assert config.read_bytes() == before and fake_png.read_text() == "notes"
    # empty files and our own outputs may be replaced
    (tmp_path / "empty.json").write_text("")
    check_output_path(tmp_path / "empty.json", "--out")
    (tmp_path / "r.json").write_text('{"benchmark": "needle"}\n')
    check_output_path(tmp_path / "r.json", "--out")


def test_the_requests_file_or_a_copy_of_it_is_not_an_output(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a"}\n{"id": "b"}\n')
    with pytest.raises(ConfigError, match=r"--output='.*requests.jsonl' is the --requests file"):
        check_answer_outputs(requests, requests)
    link = tmp_path / "alias.jsonl"
    link.symlink_to(requests)
    with pytest.raises(ConfigError, match=r"is the --requests file"):
        check_answer_outputs(link, requests)
    copy = tmp_path / "copy.jsonl"
    copy.write_text(requests.read_text())  # request lines have ids but no answers: not an answer file
    with pytest.raises(ConfigError, match=r"is not an answer file"):
        check_answer_outputs(copy, requests)


def test_a_summary_sidecar_that_is_not_ours_is_refused(tmp_path):
    out = tmp_path / "answers.jsonl"
    summary_path(out).write_text("my notes\n")
    with pytest.raises(ConfigError, match=r"--output \(its summary\)=.*is not the summary of an apbv infer job"):
        check_answer_outputs(out, tmp_path / "requests.jsonl")


# 2. The job's lock -----------------------------------------------------------------------------------------


def test_a_second_claim_fails_at_once_naming_host_and_pid_and_a_resume_takes_it_over(tmp_path):
    out = tmp_path / "answers.jsonl"
    first = OutputLock.acquire(out, "--output")
    owner = json.loads(lock_path(out).read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    with pytest.raises(ConfigError) as err:
        OutputLock.acquire(out, "--output")  # flock: another open file description conflicts, even in-process
    assert (f"--output={str(out)!r} is in use by another apbv job (host {socket.gethostname()}, pid {os.getpid()}, "
            "since ") in str(err.value)
    assert "wait for it to end (then run again to resume)" in str(err.value)
    first.release()
    with OutputLock.acquire(out, "--output"):  # the job ended: a resume claims it
        pass


def test_a_special_lock_file_is_refused(tmp_path, no_open_of):
    out = tmp_path / "answers.jsonl"
    os.mkfifo(lock_path(out))
    no_open_of(lock_path(out))
    with pytest.raises(ConfigError, match=r"--output \(its lock file\)=.*FIFO"):
        OutputLock.acquire(out, "--output")


# 3. Reading an existing answer file -----------------------------------------------------------------------


def test_garbage_deep_json_and_duplicates_are_reported_by_line_and_left_alone(tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    good = '{"id":"a","generated_ids":[1]}\n'
    text = good + "garbage\n" + "[" * 100_000 + "]" * 100_000 + "\n" + good + '{"id":"b","error":"x"}\n'
    out.write_text(text)
    assert recover_answers(out) == {"a", "b"}
    err = capsys.readouterr().err
    assert ("3 line(s) ignored and left as they are (line 2 not valid JSON (Expecting value at column 1); "
            "line 3 nested deeper than 64 levels; line 4 repeats id 'a' of line 1)") in err
    assert "Traceback" not in err and "RecursionError" not in err
    assert out.read_text() == text


def test_an_answer_file_beyond_the_cap_is_refused_unread(tmp_path, monkeypatch):
    from megatron_apbv.jobs import answers

    out = tmp_path / "answers.jsonl"
    out.write_text('{"id":"a","generated_ids":[1]}\n' * 10)
    monkeypatch.setattr(answers, "MAX_ANSWERS_BYTES", 100)
    monkeypatch.setattr(answers, "read_head", lambda *a: pytest.fail("read before the size check"))
    with pytest.raises(ConfigError, match=r"bytes is more than 100: not one job's answers"):
        recover_answers(out)


def test_a_full_disk_while_appending_is_one_error_and_takes_the_partial_record_back(tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    writer = AnswerWriter(out, "f" * 16)
    writer.append({"id": "a", "generated_ids": [1]})
    before = out.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutputError) as err:
        writer.append({"id": "b", "generated_ids": [2]})
    monkeypatch.undo()
    writer.close()
    assert str(err.value) == (f"--output={str(out)!r}: cannot write the record of 'b': the disk is full; the records "
                              "before it are on disk: free space and run again to resume")
    assert out.read_bytes() == before


# The same through apbv infer, in this process -----------------------------------------------------------


def _infer(monkeypatch, capsys, requests: Path, output: Path, *extra: str) -> tuple[int, str, str]:
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    code = cli.main(["infer", CONFIG, "--requests", str(requests), "--output", str(output), "--quiet",
                     "parallel.context_parallel_size=1", "generate.max_new_tokens=2", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _job_fingerprint(*extra: str) -> str:
    """The fingerprint :func:`_infer`'s job writes in its records."""
    from megatron_apbv.jobs.fingerprint import job_fingerprint
    from megatron_apbv.models.resolve import load_config

    return job_fingerprint(load_config(CONFIG, ["parallel.context_parallel_size=1", "generate.max_new_tokens=2",
                                                *extra]))


def _requests(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_infer_refuses_an_output_held_by_another_job_and_leaves_it_alone(tmp_path, monkeypatch, capsys):
    requests = _requests(tmp_path, '{"id": "a"}')
    out = tmp_path / "answers.jsonl"
    mine = _job_fingerprint()  # job A has this job's settings: only the lock stands in the way
    out.write_text(f'{{"id":"old","generated_ids":[1],"fingerprint":"{mine}"}}\n{{"id":"x","generated_ids":[1')
    before = out.read_bytes()
    with OutputLock.acquire(out, "--output"):  # "job A", still running
        code, stdout, err = _infer(monkeypatch, capsys, requests, out)
    assert code == 2, err
    assert f"apbv: rank 0: --output={str(out)!r} is in use by another apbv job (host {socket.gethostname()}, " \
           f"pid {os.getpid()}" in err
    assert stdout == "" and out.read_bytes() == before and not summary_path(out).exists()


def test_infer_on_a_yaml_file_or_the_requests_file_exits_2_and_changes_nothing(tmp_path, monkeypatch, capsys):
    requests = _requests(tmp_path, '{"id": "a"}')
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text(Path(CONFIG).read_text())
    for output, message in ((yaml_file, "exists and is not an answer file of apbv infer"),
                            (requests, "is the --requests file: the output must be another file")):
        before = output.read_bytes()
        code, _, err = _infer(monkeypatch, capsys, requests, output)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "requests.jsonl"]


def test_answered_before_counts_only_this_jobs_ids(tmp_path, monkeypatch, capsys):
    requests = _requests(tmp_path, '{"id": "a"}', '{"id": "b"}')
    out = tmp_path / "answers.jsonl"
    mine = _job_fingerprint()  # the other job's records share the file and the settings
    out.write_text(f'{{"id":"a","generated_ids":[1],"fingerprint":"{mine}"}}\n'
                   f'{{"id":"other-job","generated_ids":[1],"fingerprint":"{mine}"}}\n')
    code, stdout, err = _infer(monkeypatch, capsys, requests, out)
    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["answered_before"], summary["answered"], summary["remaining"]) == (1, 1, 0)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "other-job", "b"]


def test_a_full_disk_during_a_job_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    from megatron_apbv.jobs import answers

    def full(self, record):
        raise OutputError(f"--output={str(self.path)!r}: cannot write the record of {record['id']!r}: the disk is full")

    monkeypatch.setattr(answers.AnswerWriter, "append", full)
    code, stdout, err = _infer(monkeypatch, capsys, _requests(tmp_path, '{"id": "a"}'), tmp_path / "answers.jsonl")
    assert code == 1 and stdout == ""
    assert [line for line in err.splitlines() if line.startswith("apbv: ")] == [
        f"apbv: rank 0: --output={str(tmp_path / 'answers.jsonl')!r}: cannot write the record of 'a': the disk is full"
    ]
    assert "Traceback" not in err


def test_eval_out_refuses_a_device_and_an_empty_path_before_any_work(monkeypatch, capsys, no_open_of):
    from megatron_apbv.eval.evaluate import output_paths

    for device in DEVICES:
        no_open_of(device, os.path.dirname(device))
        with pytest.raises(ConfigError, match=rf"--out={device!r} is a character device"):
            output_paths(device)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    for args, message in ((["--out="], "--out='' is empty"), (["--examples", "-1"], "--examples=-1 must be between 1"),
                          (["--examples", "0"], "--examples=0 must be between 1")):
        code = cli.main(["eval", "configs/needle.yaml", "parallel.context_parallel_size=1", *args])
        err = capsys.readouterr().err
        assert code == 2 and f"apbv: rank 0: {message}" in err and "Traceback" not in err, err


def test_a_checkpoint_output_must_be_a_safetensors_file_to_be_replaced(tmp_path):
    import torch

    from megatron_apbv.runtime.atomic import atomic_save_safetensors

    ours = tmp_path / "needle.safetensors"
    atomic_save_safetensors({"w": torch.zeros(2)}, ours)
    check_output_path(ours, "--out (needle.safetensors)")
    theirs = tmp_path / "other.safetensors"
    theirs.write_text("model:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"exists and is not a safetensors file"):
        check_output_path(theirs, "--out (other.safetensors)")


def test_an_output_in_a_new_folder_is_claimed(tmp_path):
    out = tmp_path / "new" / "deeper" / "answers.jsonl"
    check_answer_outputs(out, tmp_path / "requests.jsonl")
    with OutputLock.acquire(out, "--output"):
        assert lock_path(out).is_file()
