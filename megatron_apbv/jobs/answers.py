"""The answer file of ``apbv infer``: one JSON line per finished request, appended and fsynced.

Replica leaders append to the same file: each record is one ``write`` of a whole
line to a descriptor opened with ``O_APPEND``, under an exclusive ``flock``, then
fsynced, so a killed job loses at most the requests in flight. A crash can still
leave a partial line; :func:`recover_answers` (rank 0, at start) keeps only the
complete records, rewrites the file atomically when it dropped any, and returns
the ids already answered (their requests are skipped: the resume). Error records
count as answered; delete their lines to try them again.

The sidecar ``ANSWERS.summary.json`` (:func:`summary_path`) is written atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from megatron_apbv.runtime.atomic import atomic_write_text


def summary_path(output: str | Path) -> Path:
    """``answers.jsonl`` -> ``answers.summary.json`` (any other name gets ``.summary.json`` appended)."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".summary.json")


def _complete_record(line: bytes):
    """The record of a complete line (``\\n``-terminated JSON object with a string id), else None."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("id"), str) else None


def recover_answers(output: str | Path) -> set[str]:
    """Ids answered in ``output`` (none if it does not exist); torn or foreign lines are dropped from the file."""
    output = Path(output)
    if not output.exists():
        return set()
    kept, dropped, ids = [], [], set()
    for number, line in enumerate(output.read_bytes().splitlines(keepends=True), 1):
        record = _complete_record(line)
        if record is None or record["id"] in ids:
            dropped.append(number)
            continue
        kept.append(line)
        ids.add(record["id"])
    if dropped:
        atomic_write_text(output, b"".join(kept).decode("utf-8"))
        print(f"apbv: {output}: dropped {len(dropped)} incomplete line(s) (line {', '.join(map(str, dropped))}); "
              "their requests run again", file=sys.stderr)
    return ids


class AnswerWriter:
    """Appends whole records to the answer file (one per call), flushed to disk before returning."""

    def __init__(self, output: str | Path):
        self.path = Path(output)
        self.path.parent.mkdir(parents=True, exist_ok=True)  # checked creatable before the job started
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # leaders of other replicas append to the same file
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def write_summary(output: str | Path, summary: dict) -> Path:
    """Write the sidecar summary of a job atomically; returns its path."""
    path = summary_path(output)
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path
