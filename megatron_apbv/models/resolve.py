"""A config resolved against what it names: its checkpoint, its tokenizer and its video file.

:mod:`megatron_apbv.runtime.loading` reads the YAML and the overrides and nothing else; here
the data is completed before validation, so every error still names a field of the file:

* shape keys (``model:``, and ``vision:`` for Qwen2.5-VL) from ``model.checkpoint``'s config.json;
* ``input.system_tokens`` / ``input.query_tokens`` (and ``input.context_tokens``) from the tokenized
  text of ``input.question`` (and of the document of ``input.kind=text``);
* ``input.source`` (frame count, rate, size) by probing ``input.video_path``;
* unset ``generate`` sampling keys from the checkpoint's generation_config.json.

Commands call :func:`load_config` once, where the data is needed; ``apbv infer`` resolves each
request's config only when the request is served (:mod:`megatron_apbv.jobs.requests`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

from megatron_apbv.models.hf_config import (
    checkpoint_sampling_defaults,
    model_config_from_hf,
    read_hf_config,
    vision_config_from_hf,
)
from megatron_apbv.runtime.config import ConfigError, ModelConfig, RunConfig
from megatron_apbv.runtime.loading import merge_values, read_config_data, validate_config


def load_config(
    path: Optional[str | Path] = None, overrides: Optional[list[str]] = None, values: Optional[dict] = None
) -> RunConfig:
    """Load a YAML config (or the built-in defaults), apply ``key=value`` overrides, then ``values``, and
    resolve it (:func:`resolve_config`).

    ``values`` (a nested dict, e.g. :func:`~megatron_apbv.runtime.loading.dotted_tree` of one
    ``apbv infer`` request) is merged last, by the same rule as the overrides.
    """
    return resolve_config(merge_values(read_config_data(path, overrides), values or {}))


def resolve_config(data: dict) -> RunConfig:
    """Config data (:func:`~megatron_apbv.runtime.loading.read_config_data`) completed from the files it
    names, then validated; any problem is one :class:`ConfigError` naming the field."""
    data = _with_checkpoint_shape(data)
    data = _with_chat_lengths(data)
    data = _with_video_source(data)
    data = _with_generation_defaults(data)
    return validate_config(data)


def _with_checkpoint_shape(data: dict) -> dict:
    """Fill ``model:`` (and, for Qwen2.5-VL, ``vision:``) shape keys from ``model.checkpoint``'s config.json.

    Keys given explicitly must agree with the checkpoint.
    """
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("checkpoint"):
        return data
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
    from megatron_apbv.models.chat_prompt import TokenizerError, chat_text, read_context  # transformers: lazily

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
    from megatron_apbv.models.video import VideoError, probe_video  # torch and PyAV: only for a video

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
    try:
        defaults = checkpoint_sampling_defaults(model["checkpoint"])
    except ValueError as err:
        raise ConfigError(f"model.checkpoint: {err}") from None
    unset = {k: v for k, v in defaults.items() if given.get(k) is None}
    return {**data, "generate": {**given, **unset}} if unset else data
