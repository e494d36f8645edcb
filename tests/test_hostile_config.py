"""Hostile config input (issue 20, cases 2, 3, 4, 9, 10): each is a ConfigError naming the field or file.

These checks run in ``load_config``, on every rank, before any collective; the
multi-rank command-line path is exercised in test_hostile_runs.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from megatron_apbv.runtime.config import MAX_TIMEOUT_SECONDS, ConfigError
from megatron_apbv.models.resolve import load_config
from megatron_apbv.runtime.loading import MAX_CONFIG_BYTES, UniqueKeyLoader, parse_yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


# 2. Duplicate keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, second, first",
    [
        ("apbv:\n  window: 7\nmodel:\n  num_layers: 2\napbv:\n  anchor: 16\n", "apbv", 5, 1),
        ("apbv:\n  window: 7\n  passing: 8\n  window: 3\n", "window", 4, 2),
        ("apbv:\n  passing_schedule:\n    - {a: 1,\n       a: 2}\n", "a", 4, 3),
    ],
)
def test_duplicate_keys_at_any_depth_name_the_key_and_both_lines(tmp_path, text, key, second, first):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: duplicate key {key!r} at line {second} (first at line {first}): keep one of them"
    )


def test_duplicate_keys_in_an_override_value_and_merge_keys():
    with pytest.raises(ConfigError, match=r"override 'apbv.passing_schedule=\{a: 1, a: 2\}': duplicate key 'a'"):
        load_config(CONFIG, ["apbv.passing_schedule={a: 1, a: 2}"])
    # A YAML merge (<<) may be overridden by the mapping's own key: that is what merges are for.
    assert parse_yaml("base: &b {window: 3}\napbv:\n  <<: *b\n  window: 7\n")["apbv"] == {"window": 7}


# 3. Booleans are not numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, where",
    [
        ("apbv.window=true", "apbv.window"),
        ("seed=true", "seed"),
        ("apbv.anchor=true", "apbv.anchor"),  # a budget: int, ratio or a word, never a boolean
        ("apbv.passing=false", "apbv.passing"),
        ("apbv.passing_schedule=[true, 3]", "apbv.passing_schedule.0"),
        ("model.rope_theta=true", "model.rope_theta"),
        ("input.frame_size=[true, 56]", "input.frame_size.0"),
        ("generate.stop_ids=[false]", "generate.stop_ids.0"),
        ("parallel.timeout_seconds=true", "parallel.timeout_seconds"),
    ],
)
def test_a_boolean_in_a_numeric_field_is_refused(override, where):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [override])
    value = override.split("=")[1].strip("[]").split(",")[0]
    assert str(err.value) == (
        f"invalid configuration:\n  {where}: got the boolean {value} where a number belongs: write a number"
    )


def test_floats_still_take_integers_and_integers_refuse_floats():
    assert load_config(CONFIG, ["model.rope_theta=10000"]).model.rope_theta == 10000.0
    assert load_config(CONFIG, ["apbv.anchor=1"]).anchor_len == 1  # an int budget is a token count
    with pytest.raises(ConfigError, match=r"apbv.window: Input should be a valid integer \(got 5.0\)"):
        load_config(CONFIG, ["apbv.window=5.0"])


# 4. Timeouts the backends can hold ------------------------------------------------------------------------


def test_timeout_is_bounded_by_what_the_backends_hold():
    assert MAX_TIMEOUT_SECONDS == 2_147_483  # (2**31 - 1) ms
    assert load_config(CONFIG, [f"parallel.timeout_seconds={MAX_TIMEOUT_SECONDS}"]).parallel.timeout_seconds
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["parallel.timeout_seconds=9000000000"])
    assert str(err.value) == (
        "invalid configuration:\n  parallel.timeout_seconds: 9000000000 s is above 2147483 s, the longest timeout "
        "the process-group backends hold (milliseconds in a 32-bit counter): use a smaller value"
    )
    with pytest.raises(ConfigError, match=r"parallel.timeout_seconds: Input should be a valid integer"):
        load_config(CONFIG, ["parallel.timeout_seconds=1.0e10"])


# 10. Large config files ----------------------------------------------------------------------------


def test_a_config_file_above_the_limit_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("k: 1\n" * (MAX_CONFIG_BYTES // 5 + 1))
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: {path.stat().st_size} bytes is too large for a config file (at most {MAX_CONFIG_BYTES} bytes): "
        "is it the right file?"
    )
    assert time.monotonic() - start < 1.0  # refused from its size, not parsed


def test_a_config_file_of_many_keys_gives_a_short_message(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("".join(f"k{i}: {i}\n" for i in range(5000)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 22 and lines[-1] == "  ... and 4980 more", lines[-3:]


def test_the_c_loader_is_used_when_present():
    assert issubclass(UniqueKeyLoader, yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)


# 9. Limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.max_position_embeddings=467"], "  <config>: the prompt of 468 tokens (input.system_tokens + video + "
         "input.query_tokens) is longer than model.max_position_embeddings=467: shorten the input"),
        (["generate.stop_ids=[3, -1]"], "  generate.stop_ids.1: Input should be greater than or equal to 0 (got -1)"),
        (["generate.stop_ids=[255, 256]"], "  <config>: generate.stop_ids=[255, 256]: [256] not below "
         "model.vocab_size=256: the model never emits them"),
    ],
)
def test_limits_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, overrides)
    assert str(err.value) == f"invalid configuration:\n{message}"


def test_generation_must_fit_the_positions():
    load_config(CONFIG, ["model.max_position_embeddings=484"]).check_generation_fits()  # 468 + 16
    cfg = load_config(CONFIG, ["model.max_position_embeddings=500", "generate.max_new_tokens=100000"])
    with pytest.raises(ConfigError, match=r"generate.max_new_tokens=100000 after the prompt of 468 tokens reaches "
                       r"position 100468, beyond model.max_position_embeddings=500: lower generate.max_new_tokens "
                       r"to at most 32"):
        cfg.check_generation_fits()
