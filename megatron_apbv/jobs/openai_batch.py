"""The OpenAI Batch dialect of ``apbv infer``: the JSONL that vLLM's ``run-batch`` reads, and its output lines.

A request line is ``{"custom_id": "clip-17", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
with ``body.messages`` in the chat-completions shape: a ``system`` message (text) and one ``user``
message whose content is a string or a list of parts, ``{"type": "text", "text": ...}`` and at
most one ``{"type": "video_url", "video_url": {"url": "file:///videos/17.mp4"}}`` (a plain local
path is taken too). It becomes the same :class:`~megatron_apbv.jobs.requests.Request` a dotted
line would (``id``, ``input.kind=video``, ``input.video_path``, ``input.system_prompt``,
``input.question``, ``generate.max_new_tokens`` from ``max_tokens`` or
``max_completion_tokens``, ``generate.temperature``, ``generate.top_p``, ``seed``, and
``input.fps`` from ``body.mm_processor_kwargs.fps`` as vLLM passes it to Qwen2.5-VL's
processor), so both dialects answer alike.

What cannot be a line at all (not JSON, no ``custom_id``, a duplicate, not a chat-completions
POST) is a :class:`ConfigError` naming the line and the field, as for the dotted dialect. What
this engine cannot honour in a well-formed request (a remote video URL, several videos, an
image, an assistant turn, ``n > 1``, ``stop`` strings, any other body field) becomes that
request's error record naming the field, and the job goes on.

``--output-format openai`` writes each record as a batch output line:
``{"id", "custom_id", "response": {"status_code", "request_id", "body": chat.completion}, "error"}``,
with the text in ``response.body.choices[0].message.content`` and the token counts in
``response.body.usage``; an error record has ``"response": null`` and ``"error": {"code", "message"}``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.runtime.jsonl import JSONLineError, loads_bounded

CHAT_URL = "/v1/chat/completions"
# body fields honoured as they are, and fields that are fine at their neutral value only
_SAMPLING = {"temperature": "generate.temperature", "top_p": "generate.top_p", "seed": "seed"}
_NEUTRAL = {"n": (1, None), "stream": (False, None), "logprobs": (False, None)}
_IGNORED = ("model", "user", "metadata")  # the job's model answers every request; these change nothing


def is_openai_line(obj) -> bool:
    """Whether a parsed request line is in the OpenAI Batch dialect (it has ``custom_id`` and ``body``)."""
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def line_format(text: str) -> str:
    """``"openai"`` or ``"dotted"``: the dialect of one (first non-blank) line of a request file."""
    try:
        return "openai" if is_openai_line(loads_bounded(text)) else "dotted"
    except JSONLineError:
        return "dotted"  # the dotted reader reports the line


def parse_openai_line(text: str, path: str | Path, line: int) -> tuple[str, dict, Optional[str]]:
    """Line ``line`` of an OpenAI Batch file -> :func:`openai_request` of it."""
    where = f"{path} line {line}"
    try:
        obj = loads_bounded(text)
    except JSONLineError as err:
        raise ConfigError(f"{where}: {err}") from None
    return openai_request(obj, where)


def openai_request(obj, where: str) -> tuple[str, dict, Optional[str]]:
    """One batch request object -> ``(id, dotted values, error)``; ``error`` (else None) says what in the
    request cannot be honoured, naming the field; :class:`ConfigError` when it is no batch request."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: a request must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("custom_id")
    if not isinstance(rid, str) or not rid:
        raise ConfigError(f"{where}: custom_id: every request needs a non-empty string \"custom_id\" (got {rid!r})")
    if obj.get("method", "POST") != "POST":
        raise ConfigError(f"{where}: method: only \"POST\" is a batch request (got {obj.get('method')!r})")
    if obj.get("url") != CHAT_URL:
        raise ConfigError(f"{where}: url: apbv infer answers {CHAT_URL!r} requests only (got {obj.get('url')!r})")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: body: must be an object (the chat-completions request)")
    try:
        values = body_values(body)
    except _Unsupported as err:
        return rid, {}, f"{where}: {err}"
    return rid, values, None


class _Unsupported(Exception):
    """A field of a well-formed request that this engine cannot honour (the request's error record)."""


def body_values(body: dict) -> dict:
    """The dotted request values of a chat-completions ``body``; :class:`_Unsupported` names the field."""
    values: dict = {}
    for key, value in body.items():
        if key == "messages" or key in _IGNORED:
            continue
        if key in ("max_tokens", "max_completion_tokens"):
            values["generate.max_new_tokens"] = value
        elif key in _SAMPLING:
            values[_SAMPLING[key]] = value
        elif key in _NEUTRAL:
            if value not in _NEUTRAL[key]:
                raise _Unsupported(f"body.{key}={value!r}: not supported (one answer per request, not streamed)")
        elif key == "mm_processor_kwargs":
            if not isinstance(value, dict) or set(value) - {"fps"}:
                raise _Unsupported(f"body.mm_processor_kwargs: only {{\"fps\": ...}} is supported (got {value!r})")
            if "fps" in value:
                values["input.fps"] = value["fps"]
        else:
            raise _Unsupported(f"body.{key}: not supported by apbv infer (set job-level settings in the config)")
    values.update(_message_values(body.get("messages")))
    return values


def _message_values(messages) -> dict:
    if not isinstance(messages, list) or not messages:
        raise _Unsupported("body.messages: must be a non-empty list of messages")
    values: dict = {}
    users = 0
    for i, message in enumerate(messages):
        where = f"body.messages[{i}]"
        if not isinstance(message, dict):
            raise _Unsupported(f"{where}: must be an object with role and content")
        role = message.get("role")
        if role == "system":
            if "input.system_prompt" in values:
                raise _Unsupported(f"{where}: one system message at most")
            values["input.system_prompt"] = _text_only(message.get("content"), f"{where}.content")
        elif role == "user":
            users += 1
            if users > 1:
                raise _Unsupported(f"{where}: one user turn per request (a conversation is not supported)")
            values.update(_user_values(message.get("content"), f"{where}.content"))
        else:
            raise _Unsupported(f"{where}.role={role!r}: only system and user messages are supported")
    if users == 0:
        raise _Unsupported("body.messages: no user message")
    return values


def _text_only(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(_part_text(p, f"{where}[{i}]") for i, p in enumerate(content))
    raise _Unsupported(f"{where}: must be text (a string or text parts)")


def _part_text(part: dict, where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise _Unsupported(f"{where}.text: must be a string")
    return text


def _user_values(content, where: str) -> dict:
    if isinstance(content, str):
        return {"input.question": content}
    if not isinstance(content, list):
        raise _Unsupported(f"{where}: must be a string or a list of parts")
    texts, video = [], None
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_part_text(part, at))
        elif kind == "video_url":
            if video is not None:
                raise _Unsupported(f"{at}: one video per request (this request has several)")
            video = _local_video(part.get("video_url"), f"{at}.video_url")
        elif kind in ("image_url", "input_image", "image"):
            raise _Unsupported(f"{at}: images are not supported (a request is one video and text)")
        else:
            raise _Unsupported(f"{at}.type={kind!r}: only text and video_url parts are supported")
    values = {"input.question": "".join(texts)} if texts else {}
    if video is not None:
        values.update({"input.kind": "video", "input.video_path": video})
    return values


def _local_video(value, where: str) -> str:
    url = value.get("url") if isinstance(value, dict) else None
    if not isinstance(url, str) or not url:
        raise _Unsupported(f"{where}.url: must be a non-empty string")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise _Unsupported(f"{where}.url={url!r}: a file:// URL on another host is not supported")
        return unquote(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive, i.e. a path
        raise _Unsupported(f"{where}.url={url!r}: remote videos ({parsed.scheme}://) are not supported: "
                           "download it and give its local path or a file:// URL")
    return url


def output_id(custom_id: str) -> str:
    """The batch output line's ``id``: derived from ``custom_id``, so a rerun writes the same line."""
    return "batch_req_" + hashlib.sha256(custom_id.encode("utf-8")).hexdigest()[:24]


def openai_record(record: dict, model: str, created: Optional[int] = None) -> dict:
    """One record of :mod:`.replica` (an answer or an error) -> a batch output line."""
    rid = record["id"]
    if "error" in record:
        return {"id": output_id(rid), "custom_id": rid, "response": None,
                "error": {"code": "invalid_request", "message": record["error"]}}
    prompt, completion = record["prompt_tokens"], len(record["generated_ids"])
    body = {
        "id": "chatcmpl-" + output_id(rid).removeprefix("batch_req_"),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": record["generated_text"]},
                     "finish_reason": record["finish_reason"]}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }
    return {"id": output_id(rid), "custom_id": rid,
            "response": {"status_code": 200, "request_id": "req_" + output_id(rid)[10:], "body": body},
            "error": None}


class OpenAIOutput:
    """A record sink that writes batch output lines to ``writer`` (an :class:`~.answers.AnswerWriter`)."""

    def __init__(self, writer, model: str):
        self.writer, self.model = writer, model

    def append(self, record: dict) -> None:
        self.writer.append(openai_record(record, self.model))

    def close(self) -> None:
        self.writer.close()
