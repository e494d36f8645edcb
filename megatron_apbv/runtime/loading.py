"""YAML file + ``key=value`` overrides -> the config's data, and data -> validated :class:`RunConfig`.

This reads no file but the YAML: what a config takes from its checkpoint (shape keys,
generation defaults), its tokenizer (prompt lengths) and its video (``input.source``) is
resolved a layer up, by :func:`megatron_apbv.models.resolve.load_config`, before
:func:`validate_config`, so every error still names a field of the file.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ValidationError

from megatron_apbv.runtime.config import VARIANTS, ConfigError, RunConfig, without_variant_settings

# Location parts pydantic adds for the members of a union (``apbv.anchor.constrained-int``): not config keys.
_UNION_PARTS = ("function-after", "literal[", "union[", "constrained-int", "constrained-float")
_MAX_ERROR_LINES = 20  # a file of thousands of unknown keys still gives a readable message
# A value shown in an error is cut short: a 5 MB string (or a huge list) would otherwise be the message.
_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 80
_shown.maxlist = _shown.maxtuple = _shown.maxdict = 8
_shown.maxlevel = 3


def _format_errors(err: ValidationError, model: type[BaseModel]) -> str:
    errors = err.errors()
    where_of = [".".join(str(p) for p in e["loc"] if not str(p).startswith(_UNION_PARTS)) for e in errors]
    # A boolean where a number belongs (``apbv.window=true``) gets one line, not one per union member.
    bool_for_number = {w for w, e in zip(where_of, errors)
                       if isinstance(e.get("input"), bool) and e["type"] in ("int_type", "float_type")}
    lines = []
    for where, e in zip(where_of, errors):
        if where in bool_for_number:
            value = str(e["input"]).lower()
            lines.append(f"  {where}: got the boolean {value} where a number belongs: write a number")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = model
            for part in e["loc"][:-1]:
                section = section.model_fields[part].annotation
            allowed = ", ".join(section.model_fields)
            msg = f"unknown key; allowed keys here: {allowed}"
        got = "" if e["type"] in ("extra_forbidden", "value_error") else f" (got {_shown.repr(e.get('input'))})"
        lines.append(f"  {where or '<config>'}: {msg}{got}")
    lines = list(dict.fromkeys(lines))
    if len(lines) > _MAX_ERROR_LINES:
        lines = lines[:_MAX_ERROR_LINES] + [f"  ... and {len(lines) - _MAX_ERROR_LINES} more"]
    return "invalid configuration:\n" + "\n".join(lines)


# A config is a few KiB; parsing a huge file (10 MB of keys: minutes and GBs) only delays its error.
MAX_CONFIG_BYTES = 1 << 20

# libyaml's parser when PyYAML was built with it (~10x faster), else the pure-Python one.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Values a document may expand to through its aliases: a config has a few hundred; nine nested levels of
# nine aliases (466 bytes) expand to 387 million, which pydantic and any message would walk one by one.
MAX_YAML_VALUES = 100_000


def _expanded_size(root) -> int:
    """Values the node graph stands for once every alias is expanded (shared nodes counted each time)."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:  # iterative post-order: a deep document cannot exhaust the stack here
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        value = node.value if isinstance(node.value, list) else []
        children = [child for item in value for child in (item if isinstance(item, tuple) else (item,))]
        if not children_done:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        sizes[id(node)] = min(1 + sum(sizes.get(id(c), 0) for c in children), MAX_YAML_VALUES + 1)
    return sizes[id(root)]


class _UniqueKeys:
    """Refuse a key given twice in one mapping, at any depth (mixed into a SafeLoader).

    PyYAML keeps the last of duplicated keys, so a second ``apbv:`` section would
    silently drop the first one's settings. (``<<`` merge keys may still be overridden.)
    """

    def construct_document(self, node):
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise ConfigError(
                f"the document expands to more than {MAX_YAML_VALUES} values through its aliases (*name): "
                "a config needs a few hundred; write the values out, or use fewer aliases"
            )
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                break
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {seen}): keep one of them")
            first_line[key] = line
        return super().construct_mapping(node, deep)


class UniqueKeyLoader(_UniqueKeys, _SafeLoader):
    """The config files' loader: libyaml's safe loader where present, refusing duplicate keys."""


class _UniqueKeyPyLoader(_UniqueKeys, yaml.SafeLoader):
    """For one-line override values: the pure-Python parser places errors on their column (libyaml: line 2)."""


# YAML 1.1 (PyYAML) reads ``1e-6`` as a string: with strict float fields it must be a number, as in YAML 1.2.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _loader in (UniqueKeyLoader, _UniqueKeyPyLoader):
    _loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def parse_yaml(text: str, *, loader=UniqueKeyLoader):
    """YAML text -> Python objects, refusing duplicate keys."""
    return yaml.load(text, Loader=loader)


def _yaml_problem(err: Exception) -> str:
    """``line L, column C: problem`` of a YAML error (1-based, as editors count)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


_TEXT_KEYS = frozenset({"input.question", "input.system_prompt", "input.context"})


def parse_overrides(overrides: list[str]) -> dict:
    """``["apbv.window=7", "parallel.context_parallel_size=3"]`` -> nested dict.

    Values are parsed as YAML, except the free-text keys (``input.question``, ``input.system_prompt``),
    which keep the text as typed (``null`` still unsets them).
    """
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. apbv.window=7)")
        if key in _TEXT_KEYS and raw != "null":
            _place(tree, key, raw, item)  # free text: "yes" or "Answer: A" must stay the words typed
            continue
        try:
            value = parse_yaml(raw, loader=_UniqueKeyPyLoader)
        except ConfigError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(err)}") from None
        _place(tree, key, value, item)
    return tree


def dotted_tree(values: dict) -> dict:
    """``{"input.video_frames": 4}`` -> ``{"input": {"video_frames": 4}}``, the values kept as given (JSON)."""
    tree: dict = {}
    for key, value in values.items():
        _place(tree, key, value, key)
    return tree


def _place(tree: dict, key: str, value, item: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section")
    node[parts[-1]] = value


def read_config_data(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> dict:
    """The YAML config at ``path`` (or the built-in defaults: ``{}``) with the ``key=value`` overrides merged in.

    Only the YAML file is read; nothing is validated yet (:func:`validate_config`).
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {what}")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is too large for a config file (at most {MAX_CONFIG_BYTES} bytes): "
                "is it the right file?"
            )
        try:
            data = parse_yaml(path.read_text(encoding="utf-8-sig"))  # utf-8-sig: a leading BOM is no key
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
        if data is None:
            data = {}  # an empty file (or only comments): the defaults
        elif not isinstance(data, dict):
            shown = _shown.repr(data)
            raise ConfigError(
                f"{path}: the top level is {shown}, not a mapping of sections (model:, apbv:, ...): is it a config?"
            )
    extra = parse_overrides(overrides or [])
    variant = extra.get("apbv", {}).get("variant") if isinstance(extra.get("apbv"), dict) else None
    if isinstance(variant, str) and variant in VARIANTS and isinstance(data.get("apbv"), dict):
        # A variant chosen on the command line replaces the file's settings that the variant fixes.
        data = {**data, "apbv": without_variant_settings(data["apbv"], variant)}
    return merge_values(data, extra)


def merge_values(data: dict, values: dict) -> dict:
    """``values`` (a nested dict, e.g. :func:`dotted_tree` of one request) merged into ``data``, section by
    section: a value replaces, a section merges."""
    out = dict(data)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = value
    return out


def validate_config(data: dict) -> RunConfig:
    """Config data (resolved: see :mod:`megatron_apbv.models.resolve`) -> :class:`RunConfig`, or one
    :class:`ConfigError` listing every problem by its field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, RunConfig)) from None
