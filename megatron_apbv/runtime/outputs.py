"""Every file the project writes (answers, summaries, result JSON, plots) is checked and claimed here.

Called by every rank at the top of a command, before a model is built: a path
that cannot or must not be written fails every rank at once with a
:class:`ConfigError` naming the option, instead of rank 0 failing after all the
compute. The rules, for every output:

* the path's symlinks are resolved and the *target* is written (a symlinked
  ``--output`` keeps pointing at the answers);
* the target must be missing (in an existing or creatable folder) or a regular
  file: a device (``/dev/null``, ``/dev/full``), a FIFO, a socket or a directory
  is refused from ``os.stat`` alone, never opened;
* an existing non-empty file must look like one of ours (a PNG for ``.png``, a
  safetensors file for ``.safetensors``, a JSON object or JSON lines of objects otherwise; the caller may pass a stricter
  test): a YAML config or a text file named by mistake is refused, not replaced;
* two outputs of one command, or an output and an input (``--requests``), are
  never the same file.

Nothing is created here: the writes themselves create missing directories and
are atomic (runtime/atomic.py). :class:`OutputLock` is the exclusive claim a job
holds on its output for its whole lifetime (``apbv infer``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from megatron_apbv.runtime.config import ConfigError

HEAD_BYTES = 64 * 1024  # what is read of an existing file to tell whether it is ours
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class OutputError(RuntimeError):
    """Writing an output failed mid-run (a full disk, a vanished folder): reported in one line, exit 1."""


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


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def regular_or_missing(target: Path, field: str, given) -> Optional[os.stat_result]:
    """``os.stat`` of ``target`` when it is a regular file, None when it is missing; else a ConfigError.

    Only ``stat`` is called: a FIFO or a device is never opened (opening a FIFO blocks, reading
    ``/dev/zero`` never ends).
    """
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f"{field}={str(given)!r}: cannot use it ({err.strerror or err})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"{field}={str(given)!r} is a directory: give a file path (e.g. {str(Path(given) / 'result.json')!r})"
        )
    if not stat.S_ISREG(st.st_mode):
        shown = "" if str(target) == str(given) else f" ({str(target)!r})"
        raise ConfigError(
            f"{field}={str(given)!r}{shown} is a {_kind_of(st.st_mode)}, not a regular file: apbv writes only "
            "regular files; give a file path"
        )
    return st


def read_head(target: Path, limit: int = HEAD_BYTES) -> bytes:
    """The first ``limit`` bytes of the regular file ``target`` (opened non-blocking, never following a FIFO)."""
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the stat and the open
            raise ConfigError(f"{str(target)!r} is no longer a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def looks_like_json_output(head: bytes) -> bool:
    """A JSON object, or JSON lines of objects: what our ``.json`` / ``.jsonl`` outputs start with."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")


def looks_like_png(head: bytes) -> bool:
    return head.startswith(PNG_MAGIC)


def looks_like_safetensors(head: bytes) -> bool:
    """8 bytes of header length, then the JSON header."""
    return len(head) > 8 and head[8:9] == b"{"


def _default_owned(target: Path) -> tuple[Callable[[bytes], bool], str]:
    if target.suffix.lower() == ".png":
        return looks_like_png, "a PNG image"
    if target.suffix.lower() == ".safetensors":
        return looks_like_safetensors, "a safetensors file"
    return looks_like_json_output, "a JSON file"


def check_output_path(
    path: str | os.PathLike,
    field: str,
    *,
    owned: Optional[Callable[[bytes], bool]] = None,
    owned_what: str = "",
    inputs: Optional[dict[str, str | os.PathLike]] = None,
) -> Path:
    """Raise :class:`ConfigError` unless ``path`` may be written; returns the target (symlinks resolved).

    ``field`` is the option's name as the user typed it. ``owned(head)`` tells whether an existing,
    non-empty file is one of ours (``owned_what`` names it in the message; default: by suffix, a PNG
    or a JSON file). ``inputs`` (``{"--requests": path}``) are files the command reads, which the
    output must not be.
    """
    if not str(path):
        raise ConfigError(f"{field}='' is empty: give a file path")
    target = Path(os.path.realpath(path))
    st = regular_or_missing(target, field, path)
    _check_writable_dir(target.parent, field, path)
    for what, source in (inputs or {}).items():
        if source is not None and Path(os.path.realpath(source)) == target:
            raise ConfigError(f"{field}={str(path)!r} is the {what} file: the output must be another file")
    if st is not None and st.st_size > 0:
        if owned is None:
            owned, owned_what = _default_owned(target)
        if not owned(read_head(target)):
            raise ConfigError(
                f"{field}={str(path)!r} exists and is not {owned_what}: apbv replaces only its own outputs; "
                "choose another path (or delete the file)"
            )
    return target


def check_output_dir(path: str | os.PathLike, field: str, files: tuple[str, ...]) -> Path:
    """Raise :class:`ConfigError` unless ``files`` can be written inside the directory ``path``."""
    if not str(path):
        raise ConfigError(f"{field}='' is empty: give a directory")
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
        key = Path(os.path.realpath(path))
        if key in seen:
            raise ConfigError(f"the {seen[key]} and the {what} would both be written to {str(path)!r}: {fix}")
        seen[key] = what


def lock_path(target: Path) -> Path:
    """``answers.jsonl`` -> ``answers.jsonl.lock``: the file whose ``flock`` is the job's claim."""
    return target.with_name(target.name + ".lock")


class OutputLock:
    """An exclusive claim on one output for a job's lifetime (``flock`` on ``OUTPUT.lock``, which names the owner).

    :meth:`acquire` never waits: when another live process holds the claim, it raises a
    :class:`ConfigError` naming that job's host and pid. The kernel drops the ``flock`` when the
    holder exits or is killed, so a resume after the job ended takes it over. The ``.lock``
    file stays (removing it would let a third job lock a new file while a second holds the old one).
    """

    def __init__(self, fd: int, path: Path):
        self._fd: Optional[int] = fd
        self.path = path

    @classmethod
    def acquire(cls, target: Path, field: str, given=None) -> "OutputLock":
        path = lock_path(Path(target))
        regular_or_missing(path, f"{field} (its lock file)", path)
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # checked creatable; the job's writes need it anyway
            fd = os.open(path, flags, 0o666)
        except OSError as err:
            raise ConfigError(f"{field}: cannot create the lock file {str(path)!r} ({err.strerror or err})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{field}: the lock file {str(path)!r} is not a regular file: remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"{field}: cannot lock {str(path)!r} ({err.strerror or err})") from None
                raise ConfigError(
                    f"{field}={str(given if given is not None else target)!r} is in use by another apbv job "
                    f"({_holder(fd)}): wait for it to end (then run again to resume), or choose another {field}"
                ) from None
            owner = {"host": socket.gethostname(), "pid": os.getpid(),
                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """``host H, pid P, since T`` from the lock file (at most 4 KiB read)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
        return f"host {owner['host']}, pid {owner['pid']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its host and pid are not recorded yet"
