"""The Python API of ``apbv infer``: load a config once, then answer lists of requests in the process.

Under a launcher (``torchrun --nproc_per_node 2 script.py``), every rank runs the same script::

    from megatron_apbv.jobs.request_engine import RequestEngine

    engine = RequestEngine.load("configs/tiny_cpu.yaml", ["apbv.variant=exact"])
    answers = engine.generate([{"id": "a", "input.video_frames": 4, "generate.max_new_tokens": 8}])
    engine.close()

:meth:`RequestEngine.generate` is collective: every rank passes the same list (either dialect of
the request file, :mod:`.requests`) and gets every record back, in the list's order: the records
``apbv infer`` writes (``output_format="openai"``: OpenAI batch output lines). Nothing is written
to disk; ``apbv infer`` is this plus the answers file, its resume and the summary
(:func:`~.infer.serve_requests` serves both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_apbv.inference.engine import Engine
from megatron_apbv.jobs.infer import _model_name, check_job_options, needs_vision, serve_requests
from megatron_apbv.jobs.openai_batch import openai_record
from megatron_apbv.jobs.requests import plan_requests, requests_from_objects
from megatron_apbv.runtime.config import ConfigError, RunConfig
from megatron_apbv.runtime.distributed import init_distributed, select_device, shutdown
from megatron_apbv.runtime.launch_env import LaunchEnv
from megatron_apbv.models.resolve import load_config


class RecordList:
    """A leader's record sink that keeps the records in memory."""

    def __init__(self):
        self.records: list[dict] = []

    def append(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


class RequestEngine:
    """The job's model, built once on every rank; :meth:`generate` answers requests with it."""

    def __init__(self, config: Optional[str | Path], overrides: list[str], cfg: RunConfig, engine: Engine, store):
        """``store``: the job's store (``init_distributed``'s), where the work queue of each call lives."""
        self.config, self.overrides, self.cfg, self.engine, self.store = config, overrides, cfg, engine, store

    @classmethod
    def load(cls, config: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = (), *,
             vision: Optional[bool] = None) -> "RequestEngine":
        """Load and check the config, start the process groups (from the launcher's environment) and build
        the model; ``vision`` (default: ``input.kind == video``) builds the vision tower, which any request
        with a video needs."""
        env = LaunchEnv.from_environ()
        overrides = list(overrides)
        cfg = load_config(config, overrides)
        cfg.check_world_size(env.world_size)
        device = select_device(cfg, env)
        store = init_distributed(cfg, env, device)  # also under a caller's process group (lmms-eval's)
        engine = Engine.build(cfg, device, vision=vision)
        return cls(config, overrides, cfg, engine, store)

    def generate(self, requests: list[dict], *, requests_format: str = "auto", output_format: str = "apbv",
                 pipeline: Optional[str] = None) -> list[dict]:
        """Answer ``requests`` (the same list on every rank): one record per request, in order, on every rank.

        A request that cannot be answered gets its error record, as in ``apbv infer``; a list that is
        not requests raises :class:`ConfigError` on every rank before any collective.
        """
        if output_format not in ("apbv", "openai"):
            raise ConfigError(f"output_format={output_format!r}: choose apbv or openai")
        check_job_options(self.cfg, output_format, None)
        planned = plan_requests(requests_from_objects(requests, requests_format), self.config, self.overrides)
        if needs_vision(planned) and self.engine.tower is None:
            raise ConfigError("a request has a video but the engine was loaded without the vision tower: "
                              "RequestEngine.load(..., vision=True)")
        sink = RecordList()
        serve_requests(planned, self.cfg, self.engine, store=self.store, mode=pipeline or self.cfg.jobs.pipeline,
                       stop={"signal": False}, sink=lambda: sink)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, sink.records)  # the leaders' records, to every rank
        by_id = {record["id"]: record for part in parts for record in part}
        records = [by_id[item.request.id] for item in planned]
        if output_format == "openai":
            model = _model_name(self.cfg)
            records = [openai_record(record, model) for record in records]
        return records

    def close(self) -> None:
        """Tear the process groups down (every rank)."""
        shutdown()
