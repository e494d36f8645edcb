"""YAML file + ``key=value`` overrides -> validated :class:`~megatron_apbv.runtime.config.RunConfig`.

Shape keys may come from ``model.checkpoint``'s config.json and the prompt lengths
from the tokenized text of ``input.question``; both are derived here, before
validation, so every error names a field of the file.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ValidationError

from megatron_apbv.runtime.config import (
    VARIANTS,
    ConfigError,
    ModelConfig,
    RunConfig,
    without_variant_settings,
)

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


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _with_checkpoint_shape(data: dict) -> dict:
    """Fill ``model:`` (and, for Qwen2.5-VL, ``vision:``) shape keys from ``model.checkpoint``'s config.json.

    Keys given explicitly must agree with the checkpoint.
    """
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("checkpoint"):
        return data
    from megatron_apbv.models.hf_config import model_config_from_hf, read_hf_config, vision_config_from_hf

    _check_checkpoint_is_a_folder(model["checkpoint"])
    try:
        hf = read_hf_config(model["checkpoint"])
        derived = {"model": model_config_from_hf(hf), "vision": vision_config_from_hf(hf) or {}}
    except (OSError, ValueError, TypeError) as err:  # TypeError: not a path (model.checkpoint=1)
        raise ConfigError(f"model.checkpoint={model['checkpoint']!r}: {err}") from None
    out = dict(data)
    for section, values in derived.items():
        given = data.get(section) or {}
        if not isinstance(given, dict):
            continue  # pydantic reports the wrong type
        for key, value in values.items():
            if key in given and given[key] != value:
                raise ConfigError(
                    f"{section}.{key}={given[key]!r} disagrees with the checkpoint's config.json ({value!r}): "
                    f"remove {section}.{key} to take the checkpoint's value"
                )
        out[section] = {**values, **given}
    return out


def _check_checkpoint_is_a_folder(checkpoint) -> None:
    """``model.checkpoint=/dev/zero`` (a device, FIFO or socket) is named as what it is, never opened."""
    import os
    import stat

    if not isinstance(checkpoint, (str, os.PathLike)):
        return  # read_hf_config's TypeError names it
    try:
        mode = os.stat(checkpoint).st_mode
    except OSError:
        return  # missing: read_hf_config says so
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
        raise ConfigError(
            f"model.checkpoint={str(checkpoint)!r} is not a directory (a device, FIFO or socket): point it at the "
            "folder that holds config.json and the safetensors files"
        )


def _with_chat_lengths(data: dict) -> dict:
    """Set ``input.system_tokens`` / ``input.query_tokens`` from the tokenized text of ``input.question``."""
    inp, model = data.get("input"), data.get("model") or {}
    if not isinstance(inp, dict) or not isinstance(model, dict) or inp.get("question") is None:
        return data
    if inp.get("kind") == "needle":
        raise ConfigError("input.question cannot be used with input.kind=needle (its questions are built in)")
    question, system = inp["question"], inp.get("system_prompt")
    if not isinstance(question, str) or not question or not isinstance(system, (str, type(None))):
        return data  # pydantic reports the wrong type
    path = model.get("tokenizer") or model.get("checkpoint")  # ModelConfig.tokenizer_dir, before validation
    if not path:
        raise ConfigError("input.question needs a tokenizer: set model.tokenizer (or model.checkpoint) to its dir")
    from megatron_apbv.models.chat_prompt import TokenizerError, chat_text, read_context

    try:  # input.kind text: the document between the system turn and the question
        context = read_context(inp.get("context"), inp.get("context_path")) if inp.get("kind") == "text" else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        text = chat_text(str(path), system, question, context)
    except TokenizerError as err:
        raise ConfigError(f"model.tokenizer: {err}") from None
    vocab = model.get("vocab_size", ModelConfig.model_fields["vocab_size"].default)
    ids = text.before + text.after + ((text.video_token_id,) if text.video_token_id is not None else ()) + \
        (text.context or ())
    if isinstance(vocab, int) and max(ids) >= vocab:
        raise ConfigError(
            f"model.tokenizer={str(path)!r} gives token id {max(ids)} but model.vocab_size={vocab}: the tokenizer "
            "does not belong to this model (point model.tokenizer at the checkpoint's)"
        )
    # The text's lengths replace the counts a file gives for random-id prompts (e.g. tiny_cpu.yaml's),
    # so a question can be added on the command line; the run's JSON reports the lengths used.
    derived = {"system_tokens": len(text.before), "query_tokens": len(text.after)}
    if text.context is not None:
        derived["context_tokens"] = len(text.context)
    return {**data, "input": {**inp, **derived}}


def _with_video_source(data: dict) -> dict:
    """Set ``input.source`` (frame count, rate, size) from the file ``input.video_path`` of the video kind."""
    inp = data.get("input")
    if not isinstance(inp, dict) or inp.get("kind") != "video" or not isinstance(inp.get("video_path"), str):
        return data
    if "source" in inp:
        raise ConfigError("input.source is read from input.video_path: remove it from the config")
    from megatron_apbv.models.video import VideoError, probe_video

    try:
        source = probe_video(inp["video_path"])
    except (VideoError, ImportError) as err:
        raise ConfigError(f"input.video_path: {err}") from None
    return {**data, "input": {**inp, "source": source.model_dump()}}


def _with_generation_defaults(data: dict) -> dict:
    """Fill unset ``generate`` sampling keys from ``model.checkpoint``'s generation_config.json."""
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("checkpoint"), str):
        return data
    given = data.get("generate") or {}
    if not isinstance(given, dict):
        return data  # pydantic reports the wrong type
    from megatron_apbv.inference.sampling import checkpoint_sampling_defaults

    try:
        defaults = checkpoint_sampling_defaults(model["checkpoint"])
    except ValueError as err:
        raise ConfigError(f"model.checkpoint: {err}") from None
    unset = {k: v for k, v in defaults.items() if given.get(k) is None}
    return {**data, "generate": {**given, **unset}} if unset else data


def load_config(
    path: Optional[str | Path] = None, overrides: Optional[list[str]] = None, values: Optional[dict] = None
) -> RunConfig:
    """Load a YAML config (or the built-in defaults) and apply ``key=value`` overrides, then ``values``.

    ``values`` (a nested dict, e.g. :func:`dotted_tree` of one ``apbv infer`` request) is merged
    last, by the same rule as the overrides.
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
    data = _merge(data, extra)
    data = _merge(data, values or {})
    data = _with_checkpoint_shape(data)
    data = _with_chat_lengths(data)
    data = _with_video_source(data)
    data = _with_generation_defaults(data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, RunConfig)) from None
