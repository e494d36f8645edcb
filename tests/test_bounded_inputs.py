"""Inputs that are bounded, values that are not ignored, requests that cannot poison a job (issue 31, 4-9).

Each case is a ConfigError (``apbv:`` line, exit 2) naming the field or option, or the
documented behaviour; all run in this process on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest
from rank_processes import CONFIG

from megatron_apbv import cli
from megatron_apbv.jobs.requests import plan_requests, read_requests
from megatron_apbv.runtime.config import MAX_SEED, ConfigError
from megatron_apbv.runtime.jsonl import MAX_JSON_DEPTH, loads_bounded
from megatron_apbv.models.resolve import load_config
from megatron_apbv.runtime.loading import MAX_YAML_VALUES, parse_overrides

# 6. Parsers bounded -------------------------------------------------------------------------------------


def _alias_bomb(levels: int = 9) -> str:
    text = "a0: &a0 [x,x,x,x,x,x,x,x,x]\n"
    for i in range(1, levels + 1):
        text += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


def test_a_yaml_alias_bomb_fails_with_a_short_message(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    assert path.stat().st_size < 500
    with pytest.raises(ConfigError) as err:
        load_config(path)  # expanding it (387 million values) would take minutes and gigabytes
    assert str(err.value) == (
        f"{path}: the document expands to more than {MAX_YAML_VALUES} values through its aliases (*name): a config "
        "needs a few hundred; write the values out, or use fewer aliases"
    )
    with pytest.raises(ConfigError, match=r"^override 'apbv.passing_schedule=.*expands to more than"):
        parse_overrides(["apbv.passing_schedule={" + _alias_bomb().replace("\n", ", ").rstrip(", ") + "}"])
    # a few aliases, as configs use them, are fine
    assert load_config(None, ["apbv.passing_schedule=[&p 8, *p]"]).apbv.passing_schedule == [8, 8]


def test_error_messages_show_a_long_value_cut_short():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["apbv.window=" + "x" * 1_000_000])
    assert len(str(err.value)) < 500 and "apbv.window" in str(err.value)


def _requests(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(data)
    return path


def test_deep_json_in_a_request_line_is_one_error_naming_the_line(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    path = _requests(tmp_path, b'{"id": "a"}\n{"id": "b", "input.question": ' + deep + b"}\n")
    with pytest.raises(ConfigError) as err:
        read_requests(path)
    assert str(err.value) == f"{path} line 2: nested deeper than {MAX_JSON_DEPTH} levels"
    with pytest.raises(ValueError, match="nested deeper than 64 levels"):
        loads_bounded("[" * 65 + "]" * 65)  # parsed fine by json, still refused
    assert loads_bounded("[" * 64 + "]" * 64)


def test_jsonl_splits_on_newline_only_and_accepts_a_bom(tmp_path):
    line = '{"id": "a", "input.question": "one\u2028two\u0085three\u2029four"}\r\n{"id": "b"}\n'
    path = _requests(tmp_path, b"\xef\xbb\xbf" + line.encode("utf-8"))
    requests = read_requests(path)
    assert [r.id for r in requests] == ["a", "b"] and [r.line for r in requests] == [1, 2]
    assert requests[0].values["input.question"] == "one\u2028two\u0085three\u2029four"


def test_a_request_file_that_is_a_device_is_refused_unread(tmp_path):
    with pytest.raises(ConfigError, match=r"--requests '/dev/zero' is not a regular file"):
        read_requests("/dev/zero")
    with pytest.raises(ConfigError, match=r"is a directory"):
        read_requests(tmp_path)


def test_a_yaml_config_with_a_bom_loads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + Path(CONFIG).read_bytes())
    assert load_config(path) == load_config(CONFIG)


# 8. Values not silently ignored ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [("[]\n", "[]"), ("false\n", "False"), ("7\n", "7")])
def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path, text, shown):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: the top level is {shown}, not a mapping of sections (model:, apbv:, ...): is it a config?"
    (tmp_path / "empty.yaml").write_text("# only a comment\n")
    assert load_config(tmp_path / "empty.yaml") == load_config()


def test_a_system_prompt_without_a_question_is_refused():
    with pytest.raises(ConfigError, match=r"input.system_prompt is set but input.question is not"):
        load_config(CONFIG, ["input.system_prompt=" + "x" * 5_000_000])


@pytest.mark.parametrize("size", ["[0,0]", "[0,56]", "[-4,56]"])
def test_a_frame_size_must_be_positive_for_every_kind(size):
    with pytest.raises(ConfigError, match=r"input.frame_size.\d: Input should be greater than or equal to 1"):
        load_config(CONFIG, [f"input.frame_size={size}"])


def test_a_checkpoint_that_is_a_device_is_named_as_such():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["model.checkpoint=/dev/zero"])
    assert str(err.value) == ("model.checkpoint='/dev/zero' is not a directory (a device, FIFO or socket): point it "
                              "at the folder that holds config.json and the safetensors files")


# 4./5. Poison requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("seed=-9223372036854775809", "seed: Input should be greater than or equal to 0"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    (f"seed={MAX_SEED + 1}", f"seed: Input should be less than or equal to {MAX_SEED}"),
    ("generate.temperature=1e-310", "generate.temperature: 1e-310 is below 0.0001: the logits divided by it overflow"),
    ("generate.repetition_penalty=1e-310", "generate.repetition_penalty: Input should be greater than or equal to 0.0001"),
    ("generate.repetition_penalty=1e300", "generate.repetition_penalty: Input should be less than or equal to 10000"),
])
def test_sampling_values_that_overflow_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_seed_and_temperature_edges_that_work():
    assert load_config(CONFIG, [f"seed={MAX_SEED}", "generate.temperature=0.0001"]).seed == MAX_SEED
    assert load_config(CONFIG, ["generate.temperature=0"]).generate.temperature == 0


def test_poison_and_unfinishable_requests_become_error_records_when_resolved(tmp_path):
    path = _requests(tmp_path, b"\n".join([
        b'{"id": "p", "generate.temperature": 1e-310}',
        b'{"id": "q", "seed": -9223372036854775809, "generate.temperature": 1}',
        b'{"id": "long", "generate.max_new_tokens": 1000000}',
        b'{"id": "ok", "generate.max_new_tokens": 40}',
    ]) + b"\n")
    planned = {p.request.id: p.resolve() for p in
               plan_requests(read_requests(path), CONFIG, ["jobs.max_new_tokens_limit=40"])}
    assert "generate.temperature: 1e-310 is below" in planned["p"][1]
    assert "seed: Input should be greater than or equal to 0" in planned["q"][1]
    assert planned["long"][1] == (
        "generate.max_new_tokens=1000000 is more than the job's jobs.max_new_tokens_limit=40: ask for at most 40 "
        "tokens (or raise the job's limit, keeping the longest request within parallel.timeout_seconds)")
    assert planned["ok"][1] is None and planned["ok"][0].generate.max_new_tokens == 40


def test_a_request_cannot_raise_the_jobs_limit(tmp_path):
    path = _requests(tmp_path, b'{"id": "x", "jobs.max_new_tokens_limit": 1000000}\n')
    with pytest.raises(ConfigError, match=r"line 1: 'jobs.max_new_tokens_limit' is a job-level key"):
        read_requests(path)


# 7. apbv plan / apbv eval arguments -------------------------------------------------------------------------


def _plan(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setenv("RANK", "0")
    code = cli.main(["plan", CONFIG, *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--gpus", "1000000"], "apbv: --gpus=1000000 must be between 1 and 1024"),
    (["--gpus", "0"], "apbv: --gpus=0 must be between 1 and 1024"),
    (["--gpus", "2", "--gpus-per-node", "-1"], "apbv: --gpus-per-node=-1 must be between 1 and 1024"),
    (["--gpus", "2", "--tokens", "0"], "apbv: --tokens=0 must be between 1"),
    (["--gpus", "2", "--min-anchor", "1/0"], "apbv: --min-anchor='1/0': give tokens (2048), a fraction (0.015) or a "
                                              "ratio (1/64); a ratio needs a finite numerator >= 0 and a denominator > 0"),
    (["--gpus", "2", "--min-passing", "nan"], "apbv: --min-passing='nan' must be a finite number >= 0"),
    (["--gpus", "2", "--profiles", "/etc/passwd"], "apbv: --profiles='/etc/passwd' is not a profiles YAML"),
    (["--gpus", "2", "--profiles", "/dev/zero"], "apbv: --profiles='/dev/zero' is not a regular file"),
])
def test_plan_arguments_are_checked_like_config_fields(monkeypatch, capsys, args, message):
    code, err = _plan(monkeypatch, capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err, err


# 9. SIGTERM during start-up ---------------------------------------------------------------------------------


def test_a_signal_during_start_up_prints_one_line_even_with_torch_half_imported(monkeypatch, capsys):
    from megatron_apbv.runtime.interrupts import Interrupted

    def interrupted_in_an_import(argv, interrupt):
        interrupt.signum = signal.SIGTERM
        raise Interrupted(signal.SIGTERM)

    half_imported = types.ModuleType("megatron_apbv.runtime.distributed")

    def __getattr__(name):  # what a module whose import was cut short looks like to the next import
        raise AttributeError("partially initialized module 'torch' has no attribute 'autograd'")

    half_imported.__getattr__ = __getattr__
    monkeypatch.setattr(cli, "_main", interrupted_in_an_import)
    monkeypatch.setitem(sys.modules, "megatron_apbv.runtime.distributed", half_imported)
    monkeypatch.setitem(sys.modules, "torch.distributed", sys.modules.get("torch.distributed", half_imported))
    monkeypatch.setenv("RANK", "3")
    assert cli.main(["run", CONFIG]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "apbv: rank 3: interrupted\n"
