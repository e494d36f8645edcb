"""Output paths (``bench --out``, ``eval --out``, ``infer --output``) are checked before any work starts.

Called by every rank at the top of a command, before a model is built: a path
that cannot be written fails every rank at once with a :class:`ConfigError`
naming the option, instead of rank 0 failing after all the compute (and the
other ranks then waiting out the collective timeout). Nothing is created here:
the writes themselves create missing directories and are atomic (runtime/atomic.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from megatron_apbv.runtime.config import ConfigError


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(directory: Path, field: str, given) -> None:
    """``directory`` (or, when missing, the nearest existing folder above it) must be a writable directory."""
    base = _existing_ancestor(directory)
    if not base.is_dir():
        raise ConfigError(f"{field}={str(given)!r}: {str(base)!r} is a file, not a directory: choose another path")
    try:  # os.access says yes to root even on a read-only filesystem: try it
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise ConfigError(
            f"{field}={str(given)!r}: cannot write in {str(base)!r} ({err.strerror or err}): choose a writable place"
        ) from None


def check_output_path(path: str | os.PathLike, field: str) -> Path:
    """Raise :class:`ConfigError` unless a file can be written at ``path``; returns it as a Path.

    ``path`` must not be a directory, and its folder must exist (or be creatable below an
    existing folder) and be writable. ``field`` is the option's name as the user typed it.
    """
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is a directory: give a file path (e.g. {str(out / 'result.json')!r})")
    _check_writable_dir(out.parent if str(out.parent) else Path("."), field, path)
    return out


def check_output_dir(path: str | os.PathLike, field: str, files: tuple[str, ...]) -> Path:
    """Raise :class:`ConfigError` unless ``files`` can be written inside the directory ``path``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is a file, but {field} names a directory (it gets {', '.join(files)})")
    _check_writable_dir(out, field, path)
    for name in files:
        check_output_path(out / name, f"{field} ({name})")
    return out


def check_distinct(paths: dict[str, Path], fix: str) -> None:
    """Raise :class:`ConfigError` when two outputs (``what -> path``) would land on one file."""
    seen: dict[Path, str] = {}
    for what, path in paths.items():
        key = Path(os.path.abspath(path))
        if key in seen:
            raise ConfigError(f"the {seen[key]} and the {what} would both be written to {str(path)!r}: {fix}")
        seen[key] = what
