"""The answer file of ``apbv infer``: one JSON line per finished request, appended and fsynced.

Replica leaders append to the same file: each record is one ``write`` of a whole
line to a descriptor opened with ``O_APPEND``, under an exclusive ``flock``, then
fsynced, so a killed job loses at most the requests in flight. Rank 0 holds the
job's :class:`~megatron_apbv.runtime.outputs.OutputLock` on the file for the whole
job (a second job on it fails at once), and only under it does
:func:`recover_answers` (rank 0, at start) read the file back:

* it must be a regular file that holds answer records (any other file is refused,
  never emptied), of at most :data:`MAX_ANSWERS_BYTES`, read line by line;
* a torn last line (a killed job's partial write) is cut off in place (``truncate``:
  the same file, so a symlink or a hard link keeps its target) and its request runs again;
* any other line that is not a record (garbage, too deep, a repeated id) is left as
  it is and reported by line number; the first record of an id wins.

It returns the ids answered (their requests are skipped: the resume). Error
records count as answered; delete their lines to try them again.

Every record carries the job's fingerprint (:mod:`.fingerprint`: the settings that change
answers). Before any collective every rank reads the fingerprints already in the file
(:func:`check_resume`) and refuses a resume when one differs from the job's (or a record has
none): its answers were made with other settings. ``--overwrite`` instead replaces the file
by an empty one (:func:`replace_answers`, rank 0 under the job's lock, one atomic rename:
the old answers stay whole until then) and answers every request again.

The sidecar ``ANSWERS.summary.json`` (:func:`summary_path`) is written atomically.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Optional

from megatron_apbv.runtime.atomic import atomic_write_text
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.runtime.jsonl import JSONLineError, loads_bounded
from megatron_apbv.runtime.outputs import OutputError, check_output_path, read_head, regular_or_missing

MAX_ANSWERS_BYTES = 64 << 30  # 64 GiB: millions of records; a bigger file is not one job's answers
MAX_RECORD_BYTES = 256 << 20  # one record: the generated ids (and text) of one request
_SHOWN_PROBLEMS = 10


def summary_path(output: str | Path) -> Path:
    """``answers.jsonl`` -> ``answers.summary.json`` (any other name gets ``.summary.json`` appended)."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".summary.json")


def record_id(value) -> Optional[str]:
    """The request id of an answer record (None when ``value`` is none): an object with a string id and
    generated ids or an error, or an OpenAI batch output line (``--output-format openai``: its custom_id)."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("custom_id"), str) and "response" in value and "error" in value:
        return value["custom_id"]
    if isinstance(value.get("id"), str) and ("generated_ids" in value or "error" in value):
        return value["id"]
    return None


def is_answer_record(value) -> bool:
    """A record this module writes (see :func:`record_id`)."""
    return record_id(value) is not None


def looks_like_answers(head: bytes) -> bool:
    """Whether the first bytes of a file are an answer file's (a record, or one torn record line)."""
    lines = head.split(b"\n")
    for line in lines[:-1]:  # complete lines
        try:
            if is_answer_record(loads_bounded(line)):
                return True
        except JSONLineError:
            continue
    return len(lines) == 1 and head.startswith(b'{"id":')  # only a torn first record


def looks_like_summary(head: bytes) -> bool:
    try:
        value = json.loads(head)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and "answered_before" in value


def check_answer_outputs(output: str | Path, requests: str | Path) -> Path:
    """The answer file and its summary may be written (every rank, before any collective); returns the target."""
    target = check_output_path(output, "--output", owned=looks_like_answers, owned_what="an answer file of apbv infer",
                               inputs={"--requests": requests})
    check_output_path(summary_path(target), "--output (its summary)", owned=looks_like_summary,
                      owned_what="the summary of an apbv infer job", inputs={"--requests": requests})
    return target


def _record_problem(line: bytes, seen: dict[str, int]) -> tuple[Optional[str], Optional[str]]:
    """(id, None) for a record line, (None, why not) otherwise."""
    if len(line) > MAX_RECORD_BYTES:
        return None, f"longer than {MAX_RECORD_BYTES} bytes"
    try:
        value = loads_bounded(line)
    except JSONLineError as err:
        return None, str(err)
    rid = record_id(value)
    if rid is None:
        return None, "not an answer record (an object with a string id and generated_ids or error)"
    if rid in seen:
        return None, f"repeats id {rid!r} of line {seen[rid]}"
    return rid, None


def recover_answers(output: str | Path) -> set[str]:
    """Ids answered in ``output`` (none if it does not exist); see the module docstring. Call under the job's lock."""
    target = Path(os.path.realpath(output))
    st = regular_or_missing(target, "--output", output)
    if st is None or st.st_size == 0:
        return set()
    if st.st_size > MAX_ANSWERS_BYTES:
        raise ConfigError(
            f"--output={str(output)!r}: {st.st_size} bytes is more than {MAX_ANSWERS_BYTES}: "
            "not one job's answers; choose another --output"
        )
    if not looks_like_answers(read_head(target)):
        raise ConfigError(f"--output={str(output)!r} exists and is not an answer file of apbv infer: choose another path")
    ids: dict[str, int] = {}
    problems: list[str] = []
    torn_at = None
    with open(target, "rb") as f:
        offset, number = 0, 0
        while offset < st.st_size:  # what another writer appends meanwhile is not ours to read (we hold the lock)
            line = f.readline(min(MAX_RECORD_BYTES + 1, st.st_size - offset))
            number += 1
            if not line.endswith(b"\n") and offset + len(line) >= st.st_size:
                torn_at = offset
                break
            offset += len(line)
            while not line.endswith(b"\n") and offset < st.st_size:  # an over-long line: skip the rest of it
                rest = f.readline(min(1 << 20, st.st_size - offset))
                offset += len(rest)
                line = line[:MAX_RECORD_BYTES + 1] + rest[-1:]
            rid, why = _record_problem(line, ids) if line.strip() else (None, None)
            if rid is not None:
                ids[rid] = number
            elif why is not None:
                problems.append(f"line {number} {why}")
    if torn_at is not None:
        os.truncate(target, torn_at)
        print(f"apbv: {output}: line {number} was torn (no end of line: a killed job's last write): cut off; "
              "its request runs again", file=sys.stderr)
    if problems:
        shown = "; ".join(problems[:_SHOWN_PROBLEMS])
        more = f"; and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        print(f"apbv: {output}: {len(problems)} line(s) ignored and left as they are ({shown}{more}); "
              "the first record of each id counts", file=sys.stderr)
    return set(ids)


def answer_fingerprints(output: str | Path) -> set[Optional[str]]:
    """The job fingerprints of the records in ``output`` (None for a record without one; empty when there is no
    file). Read only, on every rank: lines that are no record (a torn tail) are left to :func:`recover_answers`."""
    target = Path(os.path.realpath(output))
    st = regular_or_missing(target, "--output", output)
    if st is None or st.st_size == 0 or st.st_size > MAX_ANSWERS_BYTES:  # too large: recover_answers refuses it
        return set()
    found: set[Optional[str]] = set()
    with open(target, "rb") as f:
        while line := f.readline(MAX_RECORD_BYTES + 1):
            if not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # an over-long line (or the torn tail): not a record
                    line = f.readline(1 << 20)
                continue
            try:
                value = loads_bounded(line)
            except JSONLineError:
                continue
            if record_id(value) is not None:
                fingerprint = value.get("fingerprint")
                found.add(fingerprint if isinstance(fingerprint, str) else None)
    return found


def check_resume(output: str | Path, fingerprint: str) -> None:
    """Refuse (:class:`ConfigError`) to resume on ``output`` when its records were written with settings other
    than this job's ``fingerprint``; every rank, before any collective."""
    others = answer_fingerprints(output) - {fingerprint}
    if not others:
        return
    if None in others:
        what = "records without a job fingerprint (written by an older apbv)"
    else:
        what = f"answers made with other settings (fingerprint {', '.join(sorted(others))}; this job's is {fingerprint})"
    raise ConfigError(
        f"--output={str(output)!r} holds {what}: a resume would keep them as this job's answers. Pass --overwrite "
        "to answer every request again with these settings (the file is replaced), or choose another --output"
    )


def replace_answers(output: str | Path) -> set[str]:
    """``--overwrite``: replace ``output`` (an answer file, or nothing) by an empty one; returns no ids.

    Call under the job's lock (rank 0). One atomic rename: a crash leaves the old answers or none, never half.
    """
    target = Path(os.path.realpath(output))
    st = regular_or_missing(target, "--output", output)
    if st is None:
        return set()
    if st.st_size and not looks_like_answers(read_head(target)):
        raise ConfigError(f"--output={str(output)!r} exists and is not an answer file of apbv infer: choose another path")
    try:
        atomic_write_text(target, "")
    except OSError as err:
        raise OutputError(f"--output={str(output)!r}: cannot replace it ({err.strerror or err})") from None
    return set()


class AnswerWriter:
    """Appends whole records to the answer file (one per call), flushed to disk before returning; each record
    gets the job's ``fingerprint``."""

    def __init__(self, output: str | Path, fingerprint: str):
        self.fingerprint = fingerprint
        self.path = Path(os.path.realpath(output))
        regular_or_missing(self.path, "--output", output)  # checked at the start; it must still hold
        self.path.parent.mkdir(parents=True, exist_ok=True)  # checked creatable before the job started
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o666)

    def append(self, record: dict) -> None:
        record = {**record, "fingerprint": self.fingerprint}
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # leaders of other replicas append to the same file
        end = None
        try:
            end = os.fstat(self._fd).st_size
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as err:
            if end is not None:  # a partly written record would tear the file in the middle: take it back
                try:
                    os.ftruncate(self._fd, end)
                except OSError:
                    pass
            why = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
            raise OutputError(
                f"--output={str(self.path)!r}: cannot write the record of {record_id(record)!r}: {why}; the records "
                "before it are on disk: free space and run again to resume"
            ) from None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def write_summary(output: str | Path, summary: dict) -> Path:
    """Write the sidecar summary of a job atomically; returns its path."""
    path = summary_path(os.path.realpath(output))
    try:
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    except OSError as err:
        raise OutputError(f"{str(path)!r}: cannot write the summary ({err.strerror or err})") from None
    return path
