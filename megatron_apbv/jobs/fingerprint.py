"""The fingerprint of an ``apbv infer`` job: a hash of the settings that change its answers.

Every answer record carries it (:class:`~.answers.AnswerWriter`), so a rerun on the same
``--output`` can tell whether the answers there are this job's. The resume skips the ids
already answered, which is honest only when they were answered with the same settings: a
rerun with another ``apbv.variant``, passing budget, checkpoint or ``generate`` default
would otherwise report 0 new answers and keep the old ones. Such a rerun is refused (on
every rank, before any collective) unless ``--overwrite`` starts the file afresh.

In the hash: the ``model`` (with the checkpoint's and tokenizer's resolved folder and the
name, size and modification time of each file in it, so a replaced checkpoint counts as
another), ``vision``, ``apbv``, the job's ``input`` and ``generate`` defaults (after the
checkpoint's generation_config.json), ``dtype``, ``seed`` and the APB-V group size
(``parallel.context_parallel_size``: its blocks decide which keys pass). Not in it: where
and how the job runs (the world size, data-parallel replicas, tensor parallelism, backend,
timeouts, device) and how it serves (``jobs.*``: pipeline, batching, prefetch, progress,
metrics), which leave greedy answers as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from megatron_apbv.runtime.config import RunConfig

ANSWER_SECTIONS = ("model", "vision", "apbv", "input", "generate")
ANSWER_KEYS = ("dtype", "seed")


def folder_identity(folder: Optional[str]) -> Optional[dict]:
    """The resolved path of ``folder`` and ``name -> [size, mtime_ns]`` of its files (None without a folder).

    Stat only: the weights are never read for this.
    """
    if not folder:
        return None
    path = os.path.realpath(folder)
    files = {}
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_file():
                    st = entry.stat()
                    files[entry.name] = [st.st_size, st.st_mtime_ns]
    except OSError:  # the config's loader already said what is wrong with a missing folder
        pass
    return {"path": path, "files": dict(sorted(files.items()))}


def job_settings(cfg: RunConfig) -> dict:
    """The settings of ``cfg`` (the job's resolved config) that change its answers (see the module docstring)."""
    data = cfg.model_dump(mode="json")
    settings = {key: data[key] for key in ANSWER_SECTIONS + ANSWER_KEYS}
    settings["parallel.context_parallel_size"] = cfg.parallel.context_parallel_size
    settings["checkpoint_files"] = folder_identity(cfg.model.checkpoint)
    settings["tokenizer_files"] = folder_identity(cfg.model.tokenizer_dir)
    # the folders as resolved: a relative and an absolute path to one checkpoint are the same job
    settings["model"] = {**settings["model"], "checkpoint": None, "tokenizer": None}
    return settings


def job_fingerprint(cfg: RunConfig) -> str:
    """16 hex digits of the sha256 of :func:`job_settings` (canonical JSON): equal iff the settings are."""
    text = json.dumps(job_settings(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
