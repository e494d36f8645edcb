"""The prompt's text through the checkpoint's tokenizer: system prompt and question around the video.

With ``input.question`` set, the ids before the video (the system turn and the user turn up
to the video) and after it (the rest of the user turn and the assistant header: the APB-V
query span) come from the tokenizer's chat template. The template is rendered once with a
marker where the video goes and split there, so the video itself never passes through the
tokenizer: it stays placeholder ids that the vision tower's embeddings replace. Tokenizers
that know Qwen2.5-VL's ``<|vision_start|>``, ``<|video_pad|>`` and ``<|vision_end|>`` get them
around the video, as Qwen2.5-VL's processor writes them.

With ``input.kind: text`` a long document takes the video's place: the user turn is the
document, a blank line and the question; the document's ids (tokenized on their own, so the
context span ends exactly where the document does) are the span split across the ranks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

# Where the video goes in the rendered template; no chat template or tokenizer produces it.
_VIDEO_MARK = "\u2063<apbv-video>\u2063"
VISION_START, VIDEO_PAD, VISION_END = "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"


@dataclass(frozen=True)
class ChatText:
    """Token ids around the video of a chat prompt."""

    before: tuple[int, ...]  # system turn + user turn up to the video (with vision-start)
    after: tuple[int, ...]  # vision-end, question, end of turn, assistant header: the query span
    video_token_id: Optional[int]  # the tokenizer's video placeholder, when it has one
    context: Optional[tuple[int, ...]] = None  # input.kind text: the document's ids (the context span)


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded or cannot render the prompt."""


def has_tokenizer(path) -> bool:
    """True when the directory holds a Hugging Face tokenizer's files."""
    return any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


# apbv infer's prefetch workers resolve requests (render their text) concurrently: the first load must happen
# once, as transformers' lazy import is not thread-safe ("cannot import name 'AutoTokenizer'" in a second thread).
_LOADING = threading.Lock()


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (never downloads); loaded once per folder, thread-safe."""
    with _LOADING:
        return _load_tokenizer(path)


@lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    folder = Path(path)
    if not has_tokenizer(folder):
        raise TokenizerError(
            f"{path!r} has no tokenizer.json or tokenizer_config.json: point model.tokenizer at the "
            "checkpoint's tokenizer files"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path!r}: the tokenizer does not load: {err}") from None


def _token_id(tokenizer, text: str) -> Optional[int]:
    """The id of a single special token, or None when the vocabulary lacks it."""
    ids = tokenizer.convert_tokens_to_ids([text])
    unk = tokenizer.unk_token_id
    return ids[0] if ids and ids[0] is not None and ids[0] != unk else None


def render_chat(tokenizer, system_prompt: Optional[str], question: str, context: Optional[str] = None) -> ChatText:
    """Ids of ``[system turn | user: <video> question | assistant header]`` split at the video.

    With a chat template the turns are the template's own (Qwen's adds its default system
    prompt when ``system_prompt`` is None); without one the text is the system prompt, a
    newline, the video and the question. With ``context`` (a document, ``input.kind: text``)
    the user turn is ``context``, a blank line and the question, and ``ChatText.context``
    holds the document's ids.
    """
    gap = "\n\n" if context is not None else ""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
        {"role": "user", "content": _VIDEO_MARK + gap + question}
    ]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (system_prompt + "\n" if system_prompt else "") + _VIDEO_MARK + gap + question
    if text.count(_VIDEO_MARK) != 1:
        raise TokenizerError("the tokenizer's chat template does not keep the user's text: cannot place the video")
    before, after = text.split(_VIDEO_MARK)
    encode = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else ()
    if context is not None:
        return ChatText(before=encode(before), after=encode(after), video_token_id=None, context=encode(context))
    video = _token_id(tokenizer, VIDEO_PAD)
    if all(_token_id(tokenizer, t) is not None for t in (VIDEO_PAD, VISION_START, VISION_END)):
        before, after = before + VISION_START, VISION_END + after
    return ChatText(before=encode(before), after=encode(after), video_token_id=video)


@lru_cache(maxsize=4)
def chat_text(tokenizer_path: str, system_prompt: Optional[str], question: str,
              context: Optional[str] = None) -> ChatText:
    """:func:`render_chat` with the tokenizer of ``tokenizer_path`` (cached: config load and every
    :func:`~megatron_apbv.models.inputs.build_prompt` of a run ask for the same text)."""
    return render_chat(load_tokenizer(tokenizer_path), system_prompt, question, context)


# A document larger than this is refused: beyond any context length we serve, and read whole into memory.
MAX_CONTEXT_BYTES = 16 << 20


def read_context(context: Optional[str], context_path: Optional[str]) -> Optional[str]:
    """The document of ``input.kind: text``: ``input.context``, else the UTF-8 file ``input.context_path``.

    Raises ``ValueError`` naming the field for a missing, unreadable, non-UTF-8 or oversized file.
    """
    if context is not None:
        size = len(context.encode("utf-8"))
        if size > MAX_CONTEXT_BYTES:
            raise ValueError(f"input.context holds {size} bytes, over the {MAX_CONTEXT_BYTES} bytes allowed: shorten it")
        return context
    if context_path is None:
        return None
    path = Path(context_path)
    if not path.is_file():
        raise ValueError(f"input.context_path={context_path!r} is not a file: give the path of a UTF-8 text file")
    size = path.stat().st_size
    if size > MAX_CONTEXT_BYTES:
        raise ValueError(f"input.context_path={context_path!r} is {size} bytes, over the {MAX_CONTEXT_BYTES} bytes "
                         "allowed: shorten the document")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"input.context_path={context_path!r} is not UTF-8 text ({err.reason} at byte "
                         f"{err.start}): convert it to UTF-8") from None
