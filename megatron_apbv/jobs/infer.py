"""``apbv infer CONFIG --requests REQUESTS.jsonl --output ANSWERS.jsonl [key=value ...]``.

World = DP x CP x TP ranks: each data-parallel replica is one APB-V (CP x TP) group
built by Megatron's ``parallel_state``. Every process builds the model once
(:class:`~megatron_apbv.inference.engine.Engine`) and answers requests one after
another; replica leaders claim them dynamically (:mod:`.scheduler`) and append one
record per request to ``--output`` (:mod:`.answers`). Running the same command
again skips the ids already answered.

A request that fails for its own reasons (missing or undecodable video, a prompt
over ``model.max_position_embeddings``, a value the config rejects, a question the
tokenizer cannot render) gets the record ``{"id", "error", "replica"}``: every rank
of the replica learns every rank's verdict before the first collective on it.

SIGTERM (SLURM's warning before preemption or ``scancel``): each replica ends the
request in flight between tokens (it stays pending: the resume runs it), stops
claiming, and every rank exits 0 with all finished records on disk; the summary says ``"stopped_by_signal": true`` and how many
requests remain. (The DeepSpeed launcher itself exits 1 after forwarding a
SIGTERM to its ranks, whatever they return; under ``srun`` the job's code is the
ranks' 0.) A rank that dies fails the whole job within ``parallel.timeout_seconds``
as for every command, which must therefore exceed the longest single request:
a replica that ran out of work waits that long for the others at the end, and
``jobs.max_new_tokens_limit`` refuses (as an error record) a request too long for it.

The output is checked and claimed by :mod:`.answers` and ``runtime/outputs.py``
(regular files only, never another file; rank 0 holds the job's lock on it).

stdout carries one JSON line, the summary (rank 0); the summary line for people and
the progress bar go to stderr; ``ANSWERS.summary.json`` holds the summary too.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_apbv.inference.engine import Engine, timed_stage
from megatron_apbv.inference.generate import apbv_generate
from megatron_apbv.jobs.answers import AnswerWriter, check_answer_outputs, recover_answers, write_summary
from megatron_apbv.jobs.progress import Progress
from megatron_apbv.jobs.requests import PlannedRequest, plan_requests, read_requests
from megatron_apbv.jobs.scheduler import WorkQueue
from megatron_apbv.models.inputs import build_prompt
from megatron_apbv.runtime.agreement import _collective_device
from megatron_apbv.runtime.config import ConfigError, RunConfig
from megatron_apbv.runtime.outputs import OutputLock

STAGES = ("video_decode", "vision", "prefill", "decode")


def add_arguments(parser) -> None:
    parser.add_argument("--requests", required=True, metavar="REQUESTS.jsonl",
                        help="one JSON object per line: an id plus input.*, generate.*, seed overrides")
    parser.add_argument("--output", required=True, metavar="ANSWERS.jsonl",
                        help="answers are appended here (one JSON line per request); existing ids are skipped")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def prepare(args, cfg: RunConfig) -> list[PlannedRequest]:
    """Read and check the request file and the output path (every rank, before any collective).

    Rank 0 also claims the output for the job (:class:`OutputLock`); when another job holds it,
    the refusal is kept in ``args.output_claim`` and every rank raises it at the job's first
    broadcast, before any model is built.
    """
    from megatron_apbv.runtime.launch_env import LaunchEnv

    target = check_answer_outputs(args.output, args.requests)
    planned = plan_requests(read_requests(args.requests), args.config, args.overrides)
    args.output_claim = None
    if LaunchEnv.from_environ().rank == 0:
        try:
            args.output_claim = OutputLock.acquire(target, "--output", args.output)
        except ConfigError as err:
            args.output_claim = str(err)
    return planned


def _agree(error: Optional[str], group, size: int) -> Optional[str]:
    """The first rank's error of the replica (None when every rank is fine): the same verdict everywhere."""
    if size == 1:
        return error
    verdicts: list = [None] * size
    dist.all_gather_object(verdicts, error, group=group)
    failed = [(rank, e) for rank, e in enumerate(verdicts) if e is not None]
    if not failed:
        return None
    rank, message = failed[0]
    return message if rank == 0 or message == verdicts[0] else f"{message} (on rank {rank} of the replica)"


def answer(item: PlannedRequest, engine: Engine, group, size: int, replica: int, tokenizer,
           should_stop=None) -> Optional[dict]:
    """Answer one request on every rank of the replica; returns its record (the leader writes it).

    None when ``should_stop()`` (SIGTERM) ended its decoding between tokens: it stays pending.
    """
    rid, stages, prompt, error = item.request.id, {}, None, item.error
    if error is None:
        try:  # video decode and chat rendering: the request's own failures, found on this rank
            prompt = timed_stage(stages, "video_decode", lambda: build_prompt(item.cfg), engine.device)
        except (OSError, ValueError) as err:
            error = str(err)
    error = _agree(error, group, size)
    if error is not None:
        return {"id": rid, "error": error, "replica": replica}
    cfg = item.cfg
    out = apbv_generate(cfg, engine.device, engine=engine, prompt=prompt, barrier=False, should_stop=should_stop)
    if out["stopped_by_signal"]:
        return None
    stages.update(out["stage_seconds"])
    ids = out["generated_ids"][0]
    record = {
        "id": rid,
        "replica": replica,
        "prompt_tokens": out["prompt_tokens"],
        "anchor_len": cfg.anchor_len,
        "passing_lens": list(cfg.passing_lens()),
        "generated_ids": ids,
    }
    if tokenizer is not None:
        record["generated_text"] = tokenizer.decode(ids, skip_special_tokens=True)
    record["seconds"] = {name: round(stages.get(name, 0.0), 6) for name in STAGES}
    return record


class _Totals:
    """What a leader answered, as one vector the replicas sum."""

    FIELDS = ("answered", "errors", "prompt_tokens", "generated_tokens") + STAGES

    def __init__(self):
        self.values = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, record: dict) -> None:
        if "error" in record:
            self.values["errors"] += 1
            return
        self.values["answered"] += 1
        self.values["prompt_tokens"] += record["prompt_tokens"]
        self.values["generated_tokens"] += len(record["generated_ids"])
        for name in STAGES:
            self.values[name] += record["seconds"][name]

    def all_sum(self, device) -> dict:
        t = torch.tensor([self.values[k] for k in self.FIELDS], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(self.FIELDS, t.tolist()))


def _all_max(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def command(args, cfg: RunConfig, env, device: torch.device) -> dict:
    """``apbv infer``: answer every pending request; returns the job summary (complete on rank 0)."""
    stop = {"signal": False}

    def on_sigterm(signum, frame):  # only a flag: the loop below stops between requests
        stop["signal"] = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _run_job(args, cfg, env, device, stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if isinstance(getattr(args, "output_claim", None), OutputLock):
            args.output_claim.release()


def _run_job(args, cfg: RunConfig, env, device: torch.device, stop: dict) -> dict:
    planned: list[PlannedRequest] = args.prepared
    group = parallel_state.get_tensor_and_context_parallel_group()
    size = dist.get_world_size(group)
    replica, replicas = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    world_device = _collective_device(None)

    answered: list = [None]
    if env.rank == 0:  # under the job's lock only: recover_answers may cut a torn last line off
        claim = getattr(args, "output_claim", None)
        try:
            if not isinstance(claim, OutputLock):
                raise ConfigError(claim or "--output: the job holds no lock on it")
            answered = [(None, sorted(recover_answers(args.output)))]
        except ConfigError as err:
            answered = [(str(err), None)]
    dist.broadcast_object_list(answered, src=0)
    refusal, answered_ids = answered[0]
    if refusal is not None:  # every rank, before the model is built
        raise ConfigError(refusal)
    # answered_before counts this job's ids only: the file may hold other jobs' records too
    done_ids = set(answered_ids) & {item.request.id for item in planned}
    pending = [item for item in planned if item.request.id not in done_ids]

    engine = Engine.build(cfg, device, vision=any(p.cfg is not None and p.cfg.input.kind == "video" for p in planned))
    queue = WorkQueue(len(pending), group)
    writer = AnswerWriter(args.output) if queue.is_leader else None
    tokenizer = _tokenizer(cfg) if queue.is_leader else None
    progress = Progress(len(pending), quiet=args.quiet) if env.rank == 0 else None
    totals = _Totals()
    start = time.perf_counter()
    try:
        while (index := queue.next(stop["signal"])) is not None:
            record = answer(pending[index], engine, group, size, replica, tokenizer, lambda: stop["signal"])
            if record is None:  # SIGTERM mid-request: it runs again on resume
                continue
            if writer is not None:
                writer.append(record)
                queue.finished("error" in record)
                totals.add(record)
            if progress is not None:
                progress.update(*queue.counts())
    finally:
        if writer is not None:
            writer.close()
        if progress is not None:
            progress.close()
    seconds, stopped = _all_max([time.perf_counter() - start, float(stop["signal"])], world_device)
    sums = totals.all_sum(world_device)
    finished = int(sums["answered"] + sums["errors"])
    summary = {
        "output": str(args.output),
        "requests": len(planned),
        "answered_before": len(done_ids),
        "answered": int(sums["answered"]),
        "errors": int(sums["errors"]),
        "remaining": len(pending) - finished,
        "stopped_by_signal": bool(stopped),
        "world_size": env.world_size,
        "data_parallel_size": replicas,
        "context_parallel_size": cfg.parallel.context_parallel_size,
        "tensor_parallel_size": cfg.parallel.tensor_parallel_size,
        "seconds": round(seconds, 6),
        "requests_per_second": round(finished / seconds, 4) if seconds > 0 else None,
        "prompt_tokens_per_second": round(sums["prompt_tokens"] / seconds, 2) if seconds > 0 else None,
        "generated_tokens_per_second": round(sums["generated_tokens"] / seconds, 2) if seconds > 0 else None,
        # summed over every answered request (each measured on its replica's leader)
        "stage_seconds": {name: round(sums[name], 6) for name in STAGES},
    }
    if env.rank == 0:
        write_summary(args.output, summary)
        print(
            f"apbv infer: {summary['answered']} answered, {summary['errors']} errors, {summary['remaining']} remaining"
            f"{' (stopped by SIGTERM)' if stopped else ''} in {seconds:.1f} s = {summary['requests_per_second']} "
            f"req/s on {replicas} replica(s); stages (s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in summary["stage_seconds"].items()),
            file=sys.stderr,
        )
    return summary


def _tokenizer(cfg: RunConfig):
    """The tokenizer that renders generated text, when the config has one."""
    from megatron_apbv.models.chat_prompt import has_tokenizer, load_tokenizer

    folder = cfg.model.tokenizer_dir
    return load_tokenizer(folder) if folder and has_tokenizer(folder) else None
