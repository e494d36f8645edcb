"""Config loading: defaults, overrides, budgets, and errors that name the field and the fix."""

from pathlib import Path

import pytest

from megatron_apbv.runtime.config import ConfigError, resolve_budget
from megatron_apbv.models.resolve import load_config
from megatron_apbv.runtime.loading import parse_overrides

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def test_shipped_config_loads():
    cfg = load_config(CONFIG)
    assert cfg.parallel.context_parallel_size == 2
    assert cfg.prompt_len == 16 + 12 * 36 + 20
    assert cfg.passing_lens() == (8, 8)
    assert cfg.apbv.setting("zigzag") and cfg.apbv.setting("overlap")


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["a.b=3", "a.c=true", "d=[1, 0.5]", "e=all"]) == {
        "a": {"b": 3, "c": True}, "d": [1, 0.5], "e": "all"
    }
    cfg = load_config(CONFIG, ["apbv.window=7", "parallel.context_parallel_size=3"])
    assert cfg.apbv.window == 7 and cfg.parallel.context_parallel_size == 3


@pytest.mark.parametrize(
    "variant, passing, zigzag, overlap",
    [("apbv", 8, True, True), ("apb_like", 8, False, False), ("star", 0, True, True), ("exact", 468, True, True)],
)
def test_variants_are_configuration(variant, passing, zigzag, overlap):
    cfg = load_config(CONFIG, [f"apbv.variant={variant}"])
    assert cfg.passing_lens() == (passing, passing)
    assert cfg.apbv.setting("zigzag") is zigzag and cfg.apbv.setting("overlap") is overlap


def test_budgets_as_counts_ratios_and_rules():
    assert resolve_budget(100, 5000, "passing") == 100
    assert resolve_budget(0.01, 5000, "passing") == 50
    assert resolve_budget("auto", 128 * 1024, "passing") == 1024  # roundup(N/128, 128)
    assert resolve_budget("auto", 128 * 1024, "anchor") == 2048  # roundup(N/64, 128)
    assert resolve_budget("auto", 100, "anchor") == 100  # capped at the prompt
    cfg = load_config(CONFIG, ["apbv.passing_schedule=[4, 0.5]"])
    assert cfg.passing_lens() == (4, 234)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["apbv.windw=3"], ["apbv.windw", "unknown key", "window"]),
        (["typo=1"], ["typo", "allowed keys here: model, apbv"]),
        (["apbv.window=4"], ["apbv.window=4", "odd"]),
        (["apbv.variant=ring"], ["apbv.variant", "'apbv', 'apb_like', 'star' or 'exact'"]),
        (["apbv.passing=-1"], ["apbv.passing", "-1"]),
        (["apbv.anchor=100000"], ["apbv.anchor", "exceeds the prompt"]),
        (["model.num_query_groups=3"], ["num_attention_heads=4", "num_query_groups=3"]),
        (["parallel.tensor_parallel_size=4"], ["tensor_parallel_size=4", "divisible"]),
        (["apbv.passing_schedule=[1, 2, 3]"], ["passing_schedule", "3 entries", "num_layers=2"]),
        (["apbv.zigzag=maybe"], ["apbv.zigzag", "boolean"]),
        (["dtype=int8"], ["dtype", "float32"]),
        (["notakeyvalue"], ["key=value"]),
    ],
)
def test_bad_values_name_the_field(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_variant_conflict_inside_one_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apbv:\n  variant: star\n  passing: 4\n")
    with pytest.raises(ConfigError, match="contradicts apbv.variant='star'"):
        load_config(bad)


def test_world_size_must_match_cp_times_tp():
    cfg = load_config(CONFIG)
    cfg.check_world_size(2)
    with pytest.raises(ConfigError, match="launched with 3 ranks.*context_parallel_size=2"):
        cfg.check_world_size(3)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
