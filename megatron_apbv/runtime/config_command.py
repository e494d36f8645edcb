"""``apbv config``: the resolved configuration, or every key the schema allows.

``apbv config CONFIG [key=value ...]`` prints the validated config with every default filled in,
as YAML (``--json``: one JSON line); the output loads back to the same configuration.
``apbv config --schema`` lists every key with its type, default and description, read from the
pydantic models of ``runtime/config.py``, so the list cannot drift from what the loader accepts.

This is the one command whose stdout is not JSON by default: the YAML *is* its result.
Nothing here imports torch or Megatron (the command answers in a fraction of a second).
"""

from __future__ import annotations

import json
import types
import typing

import yaml
from annotated_types import Ge, Gt, Interval, Le, Lt, MinLen
from pydantic import BaseModel

from megatron_apbv.runtime.config import RunConfig


def add_arguments(parser) -> None:
    parser.add_argument("--schema", action="store_true", help="list every key: type, default, description")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of YAML")


def command(args, cfg: RunConfig) -> str | dict:
    """``apbv config``: text for stdout (YAML) or a record (``--json``)."""
    if args.schema:
        rows = schema_rows()
        if args.json:
            return {"keys": rows}
        return "".join(
            f"{row['key']}: {row['type']} = {json.dumps(row['default'])}"
            + (f"\n    {row['description']}" if row["description"] else "")
            + "\n"
            for row in rows
        )
    resolved = cfg.model_dump(mode="json")
    return resolved if args.json else yaml.safe_dump(resolved, sort_keys=False)


def schema_rows(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[dict]:
    """One row per leaf key of ``model`` (dotted), in the order the schema declares them."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            rows += schema_rows(field.annotation, key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        rows.append({
            "key": key,
            "type": _describe_type(field.annotation, field.metadata),
            "default": default.model_dump(mode="json") if isinstance(default, BaseModel) else _plain(default),
            "description": field.description or "",
        })
    return rows


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _constraints(metadata) -> str:
    parts = []
    for item in metadata:
        if isinstance(item, Interval):
            parts += [f"{op} {v}" for op, v in ((">", item.gt), (">=", item.ge), ("<", item.lt), ("<=", item.le))
                      if v is not None]
        for cls, op, attr in ((Gt, ">", "gt"), (Ge, ">=", "ge"), (Lt, "<", "lt"), (Le, "<=", "le")):
            if isinstance(item, cls):
                parts.append(f"{op} {getattr(item, attr)}")
        if isinstance(item, MinLen):
            parts.append(f"length >= {item.min_length}")
    return " ".join(parts)


def _describe_type(annotation, metadata=()) -> str:
    """A readable type: ``int >= 1``, ``'apbv' | 'exact'``, ``list[int] | null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = annotation.__metadata__
        nested = [m for m in inner if hasattr(m, "metadata")]  # Field(...) inside Annotated
        flat = [m for m in inner if not hasattr(m, "metadata")] + [c for m in nested for c in m.metadata]
        text = _describe_type(args[0], flat)
    elif origin is typing.Literal:
        text = " | ".join(repr(a) for a in args)
    elif origin in (typing.Union, types.UnionType):
        text = " | ".join(_describe_type(a) for a in args)
    elif origin is list:
        text = f"list[{_describe_type(args[0])}]"
    elif origin is tuple:
        text = "[" + ", ".join(_describe_type(a) for a in args) + "]"
    elif annotation is type(None):
        text = "null"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    constraints = _constraints(metadata)
    return f"{text} {constraints}" if constraints else text
