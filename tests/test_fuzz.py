"""Property tests over random (often invalid) input: a clear error or a consistent result, nothing else.

* ``SequenceLayout(...)`` over random lengths and world sizes is either valid (and
  then every rank's layout holds its invariants) or raises ``ValueError`` with a message.
* ``load_config(None, overrides)`` over random ``key=value`` overrides, drawn from
  the real keys with random values and random raw text, raises nothing but
  ``ConfigError``; when it succeeds the resolved budgets lie inside the prompt.
* A boolean in any numeric field, and a key repeated anywhere in a YAML file,
  are always a ``ConfigError`` naming that field or key.

Example counts are kept modest: the whole file runs in well under 30 s.
"""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.runtime.config import ConfigError, RunConfig
from megatron_apbv.models.resolve import load_config

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Layout --------------------------------------------------------------------------------

lengths = st.one_of(st.integers(-5, 60), st.integers(-(10**6), 10**6))


@FUZZ
@given(prompt=lengths, anchor=lengths, query=lengths, world=st.integers(-2, 9), zigzag=st.booleans(),
       passing=st.integers(0, 200))
def test_layout_is_valid_or_a_value_error(prompt, anchor, query, world, zigzag, passing):
    try:
        seq = SequenceLayout(prompt, anchor, query, world, zigzag=zigzag)
    except ValueError as err:
        assert str(err).strip(), "a ValueError without a message"
        assert min(prompt, anchor, query) < 0 or world < 1 or anchor + query > prompt
        return
    assert min(prompt, anchor, query) >= 0 and world >= 1 and anchor + query <= prompt
    if prompt > 5000:  # large valid layouts: check the arithmetic, not every index
        spans = seq.block_spans
        assert sum(len(s) for s in spans) == prompt - anchor - query
        assert max(map(len, spans)) - min(map(len, spans)) <= 1
        return
    _check_layout(seq, passing)


def _check_layout(seq: SequenceLayout, passing: int) -> None:
    spans = seq.block_spans
    context = seq.prompt_len - seq.anchor_len - seq.query_len
    # blocks: contiguous, cover the context once, tensor_split rule (earlier blocks one longer)
    assert len(spans) == seq.num_blocks
    assert spans[0].start == seq.anchor_len and spans[-1].stop == seq.anchor_len + context
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    lens = [len(s) for s in spans]
    assert all(x >= 0 for x in lens) and lens == sorted(lens, reverse=True) and lens[0] - lens[-1] <= 1
    # passing blocks never exceed their block
    passed = seq.passed_per_block(passing)
    assert all(0 <= p <= n and p == min(passing, n) for p, n in zip(passed, lens))

    owned, tail_holders, shares = [], 0, []
    for layout in seq.ranks():
        g = layout.global_indices.tolist()
        assert len(g) == layout.local_len == seq.anchor_len + sum(layout.block_lens) + seq.query_len
        assert g[: seq.anchor_len] == list(range(seq.anchor_len))
        assert g[len(g) - seq.query_len :] == list(range(seq.prompt_len - seq.query_len, seq.prompt_len))
        for (virtual, span), local in zip(layout.blocks, layout.local_block_slices()):
            assert seq.owner(virtual) == layout.rank
            assert g[local] == list(range(span.start, span.stop))
            owned.extend(g[local])
        q = layout.local_query_slice
        assert q.stop == layout.local_len and q.stop - q.start == seq.query_len
        tail_holders += layout.holds_query_keys
        share = layout.anchor_share
        assert 0 <= share.start <= share.stop <= seq.anchor_len
        shares.extend(range(share.start, share.stop))
    assert sorted(owned) == list(range(seq.anchor_len, seq.anchor_len + context))
    assert tail_holders == 1
    assert shares == list(range(seq.anchor_len))
    for bad in (-1, seq.world_size):
        with pytest.raises(ValueError, match="outside the group"):
            seq.rank(bad)


# Config overrides ----------------------------------------------------------------------------


def _keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config, sections included (overriding a section is a classic mistake)."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _keys(field.annotation, f"{prefix}{name}.")
    return out


KEYS = _keys()
words = st.sampled_from(
    ["auto", "all", "apbv", "apb_like", "star", "exact", "gloo", "nccl", "cpu", "cuda", "float32", "bfloat16",
     "float16", "synthetic", "true", "false", "null", "~", "yes", "no", "on", ".nan", ".inf", "-.inf", "0x10",
     "1e3", "1_000", "[]", "{}", "[1, 2]", "[8, 0.5, auto]", "{a: 1}", "'7'", "\"x\"", "[", "{", "]", "}", ":",
     "- a", "*alias", "&anchor x", "!!python/object:os.system ls", "!!binary xyz", "@", "`", "%", "a: b: c", ""]
)
numbers = st.one_of(
    st.integers(-3, 300), st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),
)
values = st.one_of(
    words,
    numbers.map(str),
    st.lists(st.one_of(st.integers(-2, 600), st.floats(0, 1), st.just("auto"), st.just("all")), max_size=5).map(
        lambda xs: "[" + ", ".join(map(str, xs)) + "]"
    ),
    st.text(max_size=12),
)
bad_keys = st.one_of(
    st.sampled_from(["", ".", "model.", ".model", "model..num_layers", "apbv.window.x", "nope", "model.nope",
                     "input.video_frames.extra", "=", "apbv.variant=", "model.num_layers.x.y"]),
    st.text(max_size=8),
)
# The keys that decide lengths and budgets, with numbers that are often just valid: this finds the edges.
LENGTH_KEYS = ["apbv.anchor", "apbv.passing", "apbv.passing_schedule", "apbv.variant", "model.num_layers",
               "input.system_tokens", "input.video_frames", "input.tokens_per_frame", "input.query_tokens",
               "parallel.context_parallel_size"]
budgets = st.one_of(st.integers(-2, 5000), st.floats(0, 1.5), st.sampled_from(["auto", "all", "apbv", "star",
                    "exact", "apb_like", "[auto, 3]", "[0.5, all]", "[1, 2, 3]"]))
override = st.one_of(
    st.tuples(st.sampled_from(LENGTH_KEYS), budgets).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(bad_keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=15),  # often no '=' at all
)


@FUZZ
@given(st.lists(override, max_size=6))
def test_config_overrides_fail_only_with_config_error(items):
    try:
        cfg = load_config(None, items)
    except ConfigError as err:
        assert str(err).strip()
        return
    prompt = cfg.prompt_len
    assert 0 <= cfg.anchor_len <= prompt
    assert 0 < cfg.query_len <= prompt and cfg.anchor_len + cfg.query_len <= prompt
    passing = cfg.passing_lens()
    assert len(passing) == cfg.model.num_layers
    assert all(0 <= p <= prompt for p in passing), (passing, prompt)
    # A valid config always gives a valid layout on its group.
    seq = SequenceLayout(prompt, cfg.anchor_len, cfg.query_len, cfg.parallel.context_parallel_size,
                         zigzag=cfg.apbv.setting("zigzag"))
    if prompt <= 5000 and seq.world_size <= 16:
        _check_layout(seq, max(passing))


paper_rules = st.floats(0.01, 64.0).map(lambda k: f"{{paper: {k}}}")
anchor_budgets = st.one_of(st.integers(0, 600), st.floats(0.001, 1.0), st.sampled_from(["auto", "paper"]), paper_rules)
passing_budgets = st.one_of(st.integers(0, 5000), st.floats(0.001, 1.0), st.sampled_from(["auto", "paper", "all"]),
                            paper_rules, st.floats(0.001, 1.0).map(lambda f: f"{{block: {f}}}"))
plausible = st.fixed_dictionaries({}, optional={
    "input.system_tokens": st.integers(0, 300),
    "input.video_frames": st.integers(0, 40),
    "input.tokens_per_frame": st.integers(1, 64),
    "input.query_tokens": st.integers(1, 64),
    "model.num_layers": st.integers(1, 4),
    "apbv.variant": st.sampled_from(["apbv", "apb_like", "star", "exact"]),
    "apbv.anchor": anchor_budgets,
    "apbv.passing": passing_budgets,
    "apbv.passing_schedule": st.lists(passing_budgets, min_size=1, max_size=4).map(
        lambda xs: "[" + ", ".join(map(str, xs)) + "]"),
    "apbv.zigzag": st.booleans(),
    "parallel.context_parallel_size": st.integers(1, 8),
    "input.kind": st.sampled_from(["synthetic", "video", "needle"]),
    "input.frame_size": st.lists(st.sampled_from([0, 27, 28, 56, 84, 100]), min_size=1, max_size=3).map(str),
    "vision.patch_size": st.sampled_from([1, 7, 14]),
    "vision.spatial_merge_size": st.sampled_from([1, 2, 3]),
    "vision.temporal_patch_size": st.sampled_from([1, 2, 3]),
})


@FUZZ
@given(plausible)
def test_config_budgets_stay_inside_the_prompt(chosen):
    """Mostly valid length/budget overrides: the resolved anchor and passing budgets are real token counts."""
    items = [f"{key}={value}" for key, value in chosen.items()]
    test_config_overrides_fail_only_with_config_error.hypothesis.inner_test(items)


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), st.one_of(numbers, words), max_size=4))
def test_config_files_fail_only_with_config_error(tmp_path_factory, entries):
    """The same through a YAML file: nested mappings built from the dotted keys."""
    tree: dict = {}
    for key, value in entries.items():
        *sections, leaf = key.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
    path = tmp_path_factory.mktemp("cfg") / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert str(err).strip()
        return
    assert 0 <= cfg.anchor_len <= cfg.prompt_len
    assert all(0 <= p <= cfg.prompt_len for p in cfg.passing_lens())
    assert not any(isinstance(v, float) and math.isnan(v) for v in (cfg.model.rope_theta, cfg.model.init_std))


# Booleans in numeric fields, duplicate keys ------------------------------------------------------------


def _numeric_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys whose type holds an int or a float (not a bool): a boolean there must be refused."""
    out = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _numeric_keys(field.annotation, f"{prefix}{name}.")
        elif _holds_number(field.annotation):
            out.append(prefix + name)
    return out


def _holds_number(annotation) -> bool:
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    return any(_holds_number(arg) for arg in getattr(annotation, "__args__", ()) + getattr(
        annotation, "__metadata__", ()) if not isinstance(arg, (str, int, float)) or isinstance(arg, type))


NUMERIC_KEYS = _numeric_keys()


def test_the_numeric_keys_are_found():
    assert {"seed", "apbv.window", "apbv.anchor", "apbv.passing", "model.rope_theta", "input.frame_size",
            "generate.stop_ids", "parallel.timeout_seconds"} <= set(NUMERIC_KEYS)
    assert "model.qkv_bias" not in NUMERIC_KEYS and "apbv.zigzag" not in NUMERIC_KEYS


def _is_sequence(key: str) -> bool:
    section, _, leaf = key.rpartition(".")
    model = RunConfig.model_fields[section].annotation if section else RunConfig
    return "list" in str(model.model_fields[leaf].annotation) or "tuple" in str(model.model_fields[leaf].annotation)


@FEW
@given(key=st.sampled_from(NUMERIC_KEYS), value=st.booleans())
def test_a_boolean_in_any_numeric_field_is_refused(key, value):
    text = str(value).lower()
    sequence = _is_sequence(key)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={'[' + text + ', 2]' if sequence else text}"])
    where = f"{key}.0" if sequence else key
    assert f"  {where}: got the boolean {text} where a number belongs: write a number" in str(err.value), (
        str(err.value))


yaml_keys = st.text(alphabet="abcxz_", min_size=1, max_size=4)
yaml_trees = st.recursive(
    st.one_of(st.integers(-5, 5), st.booleans(), st.sampled_from(["auto", "all", "x"])),
    lambda children: st.dictionaries(yaml_keys, children, min_size=1, max_size=4),
    max_leaves=12,
).filter(lambda tree: isinstance(tree, dict))


def _yaml_lines(tree: dict, indent: str = "") -> list[str]:
    lines = []
    for key, value in tree.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *_yaml_lines(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {str(value).lower() if isinstance(value, bool) else value}")
    return lines


def _yaml_lines_with_duplicate(tree: dict, path: list[int], indent: str = "") -> tuple[list[str], str]:
    """``tree``'s YAML with one entry, chosen by ``path`` (at any depth), written twice; returns (lines, key)."""
    keys = list(tree)
    pick = keys[path[0] % len(keys)]
    lines, dup = [], pick
    for key, value in tree.items():
        entry = _yaml_lines({key: value}, indent)
        if key != pick:
            lines += entry
        elif len(path) > 1 and isinstance(value, dict):
            sub, dup = _yaml_lines_with_duplicate(value, path[1:], indent + "  ")
            lines += [f"{indent}{key}:", *sub]
        else:
            lines += entry + entry
    return lines, dup


@FEW
@given(tree=yaml_trees, path=st.lists(st.integers(0, 3), min_size=1, max_size=4))
def test_a_duplicate_key_anywhere_is_refused(tmp_path_factory, tree, path):
    lines, dup = _yaml_lines_with_duplicate(tree, path)
    text = "\n".join(lines) + "\n"
    assert yaml.safe_load(text) == yaml.safe_load("\n".join(_yaml_lines(tree)))  # PyYAML alone: silently taken
    file = tmp_path_factory.mktemp("dup") / "dup.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(file)
    assert f"duplicate key {dup!r} at line " in str(err.value), (text, str(err.value))
