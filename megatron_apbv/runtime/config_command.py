"""``apbv config``: the resolved configuration, or every key the schema allows.

``apbv config CONFIG [key=value ...]`` prints the validated config with every default filled in,
as YAML (``--json``: one JSON line); the output loads back to the same configuration.
``apbv config --schema`` lists every key with its type, default and description, read from the
pydantic models of ``runtime/config.py``, so the list cannot drift from what the loader accepts.
``apbv config --examples DIR`` writes the configs and the demo request file that ship with the
package (the repository's ``configs/``, which the commands' ``--help`` examples name) into ``DIR``,
so an installed ``apbv`` has them outside the repository.

This is the one command whose stdout is not JSON by default: the YAML *is* its result.
Nothing here imports torch or Megatron (the command answers in a fraction of a second).
"""

from __future__ import annotations

import json
import types
import typing
from importlib import resources
from pathlib import Path

import yaml
from annotated_types import Ge, Gt, Interval, Le, Lt, MinLen
from pydantic import BaseModel

from megatron_apbv.runtime.config import ConfigError, RunConfig

EXAMPLE_SUFFIXES = (".yaml", ".jsonl")


def add_arguments(parser) -> None:
    parser.add_argument("--schema", action="store_true", help="list every key: type, default, description")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of YAML")
    parser.add_argument("--examples", metavar="DIR", default=None,
                        help="write the shipped example configs and demo requests into DIR (created if missing; "
                             "existing files are never replaced) and list them")


def command(args, cfg: RunConfig) -> str | dict:
    """``apbv config``: text for stdout (YAML) or a record (``--json``, ``--examples``)."""
    if args.examples is not None:
        return {"examples": write_examples(Path(args.examples))}
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


def shipped_examples() -> list:
    """The example files that ship with the package (``megatron_apbv/configs``, a link to ``configs/``)."""
    folder = resources.files("megatron_apbv") / "configs"
    return sorted((f for f in folder.iterdir() if f.name.endswith(EXAMPLE_SUFFIXES)), key=lambda f: f.name)


def write_examples(directory: Path) -> list[str]:
    """Copy :func:`shipped_examples` into ``directory``; returns the paths written. Refuses to replace a file."""
    examples = shipped_examples()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--examples={str(directory)!r} is not a directory: give a folder to write the examples to")
    taken = [str(directory / f.name) for f in examples if (directory / f.name).exists()]
    if taken:
        raise ConfigError(f"--examples: {', '.join(taken)} already exist(s): choose an empty or new folder")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for example in examples:
        target = directory / example.name
        with open(target, "xb") as out:  # "x": never replaces what appeared meanwhile
            out.write(example.read_bytes())
        written.append(str(target))
    return written


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
