"""JSON lines as the project reads them (request files, existing answer files): bounded in depth and size.

* Lines end at ``\\n`` only (``\\r\\n`` too: ``\\r`` is JSON whitespace). ``str.splitlines``
  would also split at U+2028, U+0085 or a form feed, which JSON allows raw inside a
  string: a valid line would become two broken ones.
* A UTF-8 byte-order mark at the start of the file is skipped (editors on Windows write one).
* A value nested deeper than :data:`MAX_JSON_DEPTH` is refused with one message, never a
  ``RecursionError`` (Python's parser recurses once per level).
"""

from __future__ import annotations

import json
from typing import Iterator

MAX_JSON_DEPTH = 64  # a request is one flat object of dotted keys; an answer record nests two levels
UTF8_BOM = b"\xef\xbb\xbf"


class JSONLineError(ValueError):
    """A line that is not the JSON it should be; the message says why (without the line's text)."""


def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _bracket_depth_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit`` (only run where the parser gave up)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def loads_bounded(text: str | bytes, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` that raises :class:`JSONLineError` for invalid JSON or nesting beyond ``max_depth``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONLineError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as err:
        raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        if _bracket_depth_exceeds(raw[: err.pos + 1], max_depth):
            raise JSONLineError(f"nested deeper than {max_depth} levels") from None
        raise JSONLineError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise JSONLineError(f"not UTF-8 (byte {err.start + 1})") from None
    if json_depth(value) > max_depth:
        raise JSONLineError(f"nested deeper than {max_depth} levels")
    return value


def split_lines(data: bytes) -> Iterator[tuple[int, bytes, bool]]:
    """``(line number, line without its \\n, whether the \\n was there)`` for every line of ``data``.

    A leading UTF-8 BOM is dropped; only ``\\n`` ends a line.
    """
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    start, number = 0, 0
    while start < len(data):
        number += 1
        end = data.find(b"\n", start)
        if end < 0:
            yield number, data[start:], False
            return
        yield number, data[start:end], True
        start = end + 1
