"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Data goes to a temporary file in the destination's own directory (so the final
``os.replace`` is a rename on one filesystem, atomic on POSIX and Windows), is
flushed and fsynced, then renamed over the destination, and the directory is
fsynced so the rename itself survives a crash. If anything fails before the
rename, the temporary file is removed and the old file is left as it was.

The destination's symlinks are resolved first (the link keeps pointing at the new
file), and a destination that exists but is not a regular file (``/dev/null``, a
FIFO, a directory) is refused before anything is created: renaming over a device
would replace it for the whole machine (runtime/outputs.py checks every output
at the start of a command; this is the last line of defence).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator, Mapping, Optional

import torch


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _final_mode(path: Path) -> int:
    """Keep an existing file's permissions; a new file gets the default (0666 minus the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO]:
    """``with atomic_open(path, "w") as f: f.write(...)``: ``path`` is replaced only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    from megatron_apbv.runtime.outputs import regular_or_missing

    given = path
    path = Path(os.path.realpath(path))
    regular_or_missing(path, "output", given)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[dict[str, str]] = None
) -> None:
    """``safetensors.torch.save_file`` with the same all-or-nothing guarantee."""
    from safetensors.torch import save

    # safetensors wants contiguous CPU tensors that share no storage (tied weights are copied).
    prepared, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        prepared[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    data = save(prepared, metadata=metadata)
    atomic_write_bytes(path, data)
