"""The request file of ``apbv infer``: one JSON object per line, read and checked before any model is built.

A line is ``{"id": "clip-17", "input.video_path": "videos/17.mp4", "input.question": "..."}``:
a unique string ``id`` plus dotted overrides of the request-level keys (``input.*``,
``generate.*``, ``seed``). Everything else (``model.*``, ``parallel.*``, ``apbv.*``,
``vision.*``, ``dtype``, ``device``) belongs to the job: the model is built once for
every request. A file-level mistake (bad JSON, a missing or duplicate id, an unknown
or job-level key) is a :class:`ConfigError` naming the line and the field, raised on
every rank before any collective.

Each request's :class:`RunConfig` is the job's config data (the YAML read once) plus its
overrides, resolved against its checkpoint, tokenizer and video and validated by
:func:`~megatron_apbv.models.resolve.resolve_config` only when the request is served
(:meth:`PlannedRequest.resolve`): at start a job of 10,000 video requests reads no video.
A request whose values the config rejects, whose video cannot be probed (or whose prompt
is longer than ``model.max_position_embeddings``) becomes an error answer; the job goes on,
and so does a request asking for more than ``jobs.max_new_tokens_limit`` new tokens (one
such request would hold its replica past ``parallel.timeout_seconds`` and fail the job on
every resume).

The file is JSON lines as :mod:`megatron_apbv.runtime.jsonl` reads them: split at
``\n`` only, a UTF-8 BOM skipped, nesting bounded; it must be a regular file of at
most :data:`MAX_REQUEST_FILE_BYTES` (every rank reads all of it).

The file may instead be in the OpenAI Batch dialect (:mod:`.openai_batch`, vLLM's ``run-batch``
input), recognised by its first line or chosen with ``--requests-format``; its lines become the
same requests.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_apbv.jobs.openai_batch import is_openai_line, openai_request
from megatron_apbv.models.resolve import resolve_config
from megatron_apbv.runtime.config import ConfigError, InputConfig, RunConfig
from megatron_apbv.runtime.jsonl import JSONLineError, loads_bounded, split_lines
from megatron_apbv.runtime.loading import dotted_tree, merge_values, read_config_data

REQUEST_SECTIONS = ("input", "generate")
REQUEST_KEYS = ("seed",)
REQUEST_FORMATS = ("auto", "dotted", "openai")
MAX_REQUEST_FILE_BYTES = 1 << 30
# `seed` of a request seeds its prompt (random ids, synthetic video) and its sampler; the weights come from the job's.


@dataclass(frozen=True)
class Request:
    id: str
    line: int  # 1-based line number in the request file
    values: dict  # dotted key -> JSON value, as written (or translated from the OpenAI dialect)
    error: Optional[str] = None  # a translated request this engine cannot honour: its error record


@dataclass(frozen=True)
class PlannedRequest:
    """A request with its unresolved config data, or the reason it cannot be answered (the same on every rank)."""

    request: Request
    data: Optional[dict]  # the job's config data merged with the request's values (None with an error)
    error: Optional[str] = None

    @property
    def kind(self) -> Optional[str]:
        """The request's ``input.kind`` as written (the default when unset; None when it has an error)."""
        if self.error is not None:
            return None
        section = self.data.get("input")
        kind = section.get("kind") if isinstance(section, dict) else None
        return kind if kind is not None else InputConfig.model_fields["kind"].default

    def resolve(self) -> tuple[Optional[RunConfig], Optional[str]]:
        """``(config, None)``, or ``(None, why)`` when the request cannot be one answer.

        Reads what the config names (checkpoint config.json, tokenizer, the video's container): call it
        when the request is served, on every rank of its replica.
        """
        if self.error is not None:
            return None, self.error
        try:
            cfg = resolve_config(self.data)
        except ConfigError as err:
            return None, str(err)
        problem = request_problem(cfg)
        return (cfg, None) if problem is None else (None, problem)


def _check_key(key: str, where: str) -> None:
    if key in REQUEST_KEYS:
        return
    top, _, rest = key.partition(".")
    if top in RunConfig.model_fields and top not in REQUEST_SECTIONS:
        raise ConfigError(
            f"{where}: {key!r} is a job-level key (the model is built once for all requests): set it in the "
            f"config or on the command line; a request may set only input.*, generate.* and seed"
        )
    if top not in REQUEST_SECTIONS:
        raise ConfigError(f"{where}: unknown key {key!r}; a request may set only input.*, generate.* and seed")
    section = RunConfig.model_fields[top].annotation
    if rest not in section.model_fields:
        raise ConfigError(
            f"{where}: unknown key {key!r}; allowed keys of {top}: {', '.join(section.model_fields)}"
        )


def dotted_request(obj, where: str, line: int) -> Request:
    """A parsed dotted request object -> :class:`Request`; errors start with ``where``."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: a request must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise ConfigError(f"{where}: id: every request needs a non-empty string \"id\" (got {rid!r})")
    values = {k: v for k, v in obj.items() if k != "id"}
    for key in values:
        _check_key(key, where)
    return Request(rid, line, values)


def parse_request_line(text: str, path: str | Path, line: int) -> Request:
    """Line ``line`` of the request file -> :class:`Request`; every error starts ``FILE line N``."""
    where = f"{path} line {line}"
    try:
        obj = loads_bounded(text)
    except JSONLineError as err:
        raise ConfigError(f"{where}: {err}") from None
    return dotted_request(obj, where, line)


def _openai(obj, where: str, line: int) -> Request:
    rid, values, error = openai_request(obj, where)
    return Request(rid, line, values, error)


def requests_from_objects(objects: list, requests_format: str = "auto", source: str = "requests") -> list[Request]:
    """Parsed request objects (a list of dicts, as the file's lines would be) -> requests, checked as the
    file's are: ``dotted``, ``openai`` (:mod:`.openai_batch`) or ``auto`` (the first object's dialect).
    Errors name ``source[i]``; a request's ``line`` is its 1-based place in the list."""
    requests = _checked(((f"{source}[{i}]", i + 1, obj) for i, obj in enumerate(objects)), requests_format,
                        place=lambda line: f"{source}[{line - 1}]")
    if not requests:
        raise ConfigError(f"{source}: no requests")
    return requests


def read_requests(path: str | Path, requests_format: str = "auto") -> list[Request]:
    """Every request of ``path`` in file order (blank lines skipped); :class:`ConfigError` on a bad line.

    ``requests_format``: ``dotted``, ``openai`` (:mod:`.openai_batch`) or ``auto`` (the first line's).
    """
    if requests_format not in REQUEST_FORMATS:
        raise ConfigError(f"--requests-format={requests_format!r}: choose one of {', '.join(REQUEST_FORMATS)}")
    path = Path(path)
    data = _read_request_file(path)

    def objects():
        for number, raw, _ in split_lines(data):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path} line {number}: not UTF-8 (byte {err.start + 1} of the line)") from None
            if not text.strip():
                continue
            try:
                obj = loads_bounded(text)
            except JSONLineError as err:
                raise ConfigError(f"{path} line {number}: {err}") from None
            yield f"{path} line {number}", number, obj

    requests = _checked(objects(), requests_format)
    if not requests:
        raise ConfigError(f"--requests {str(path)!r}: no requests in the file")
    return requests


def _checked(objects, requests_format: str, place=lambda line: f"line {line}") -> list[Request]:
    """``(where, line, object)`` items -> requests in order, each id once."""
    if requests_format not in REQUEST_FORMATS:
        raise ConfigError(f"requests_format={requests_format!r}: choose one of {', '.join(REQUEST_FORMATS)}")
    parse = {"dotted": dotted_request, "openai": _openai}.get(requests_format)
    requests: list[Request] = []
    first: dict[str, int] = {}
    for where, line, obj in objects:
        if parse is None:  # auto: the first request's dialect is the file's
            parse = _openai if is_openai_line(obj) else dotted_request
        request = parse(obj, where, line)
        if request.id in first:
            key = "custom_id" if parse is _openai else "id"
            raise ConfigError(
                f"{where}: {key}: duplicate id {request.id!r} (first on {place(first[request.id])}): "
                "ids must be unique (they key the answers and the resume)"
            )
        first[request.id] = line
        requests.append(request)
    return requests


def _read_request_file(path: Path) -> bytes:
    """The bytes of a regular request file of bounded size (a FIFO or a device is never opened)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise ConfigError(f"--requests {str(path)!r}: cannot read it ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise ConfigError(f"--requests {str(path)!r} is {what}: give a JSON-lines file")
    if st.st_size > MAX_REQUEST_FILE_BYTES:
        raise ConfigError(
            f"--requests {str(path)!r}: {st.st_size} bytes is more than {MAX_REQUEST_FILE_BYTES}: split it into "
            "several jobs"
        )
    try:
        with open(path, "rb") as f:
            return f.read(MAX_REQUEST_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"--requests {str(path)!r}: cannot read it ({err.strerror or err})") from None


def _one_document(values: dict) -> dict:
    """A request's document (input.context or input.context_path) replaces the job's, whichever key that used."""
    for mine, other in (("input.context", "input.context_path"), ("input.context_path", "input.context")):
        if values.get(mine) is not None and other not in values:
            return {other: None, **values}
    return values


def plan_requests(
    requests: list[Request], config: Optional[str | Path], overrides: list[str]
) -> list[PlannedRequest]:
    """Each request's config data (job config + CLI overrides + its values), or why it cannot run.

    The config file is read once; no request's files are (:meth:`PlannedRequest.resolve` does, when served).
    """
    job = read_config_data(config, overrides)
    planned = []
    for request in requests:
        if request.error is not None:
            planned.append(PlannedRequest(request, None, request.error))
            continue
        try:
            planned.append(PlannedRequest(request, merge_values(job, dotted_tree(_one_document(request.values)))))
        except ConfigError as err:  # a key given as both a value and a section
            planned.append(PlannedRequest(request, None, str(err)))
    return planned


def request_problem(cfg: RunConfig) -> Optional[str]:
    """Why a valid config cannot be one job answer (None when it can)."""
    try:
        cfg.check_generation_fits()  # the one rule of apbv generate, before any collective
    except ConfigError as err:
        return str(err)
    if cfg.input.batch_size != 1:
        return "input.batch_size must be 1: a request is one prompt"
    if cfg.input.kind == "needle":
        return "input.kind=needle is the benchmark's input (apbv eval), not a request"
    limit = cfg.jobs.max_new_tokens_limit
    if cfg.generate.max_new_tokens > limit:
        return (
            f"generate.max_new_tokens={cfg.generate.max_new_tokens} is more than the job's "
            f"jobs.max_new_tokens_limit={limit}: ask for at most {limit} tokens (or raise the job's limit, keeping "
            "the longest request within parallel.timeout_seconds)"
        )
    return None
