"""``apbv infer CONFIG --requests REQUESTS.jsonl --output ANSWERS.jsonl [key=value ...]``.

World = DP x CP x TP ranks: each data-parallel replica is one APB-V (CP x TP) group
built by Megatron's ``parallel_state``. Every process builds the model once
(:class:`~megatron_apbv.inference.engine.Engine`); replica leaders claim requests
dynamically (:mod:`.scheduler`) and append one record per request to ``--output``
(:mod:`.answers`) as it finishes. ``--pipeline`` / ``jobs.pipeline`` picks how a
replica serves them (:mod:`.serve`): ``pipelined`` (frames prefetched by CPU
workers, continuous batched decoding of up to ``jobs.batch_size`` sequences) or
``serial`` (one request after another). Running the same command again skips the
ids already answered, when the file's records carry this job's fingerprint
(:mod:`.fingerprint`); records of other settings refuse the resume on every rank,
and ``--overwrite`` answers every request again in a replaced file.

A request that fails for its own reasons (missing or undecodable video, a prompt
over ``model.max_position_embeddings``, a value the config rejects, a question the
tokenizer cannot render) gets the record ``{"id", "error", "replica", "fingerprint"}``: every rank
of the replica learns every rank's verdict before the first collective on it. The
request file is parsed and checked at start (ids, keys), but each request's config is
resolved against its video, tokenizer and checkpoint only when a replica serves it
(:meth:`~.requests.PlannedRequest.resolve`), so start-up does not grow with the
number of videos.

SIGTERM (SLURM's warning before preemption or ``scancel``): each replica stops
claiming; the serial pipeline ends the request in flight between tokens (it stays
pending: the resume runs it), the pipelined one finishes the sequences in flight
(each bounded by ``jobs.max_new_tokens_limit``; claimed but not started requests are
left for the resume). Every rank exits 0 with all finished
records on disk; the summary says ``"stopped_by_signal": true`` and how many
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_apbv.inference.engine import STAGES, Engine
from megatron_apbv.inference.stage_clock import StageClock
from megatron_apbv.jobs.answers import (
    AnswerWriter,
    check_answer_outputs,
    check_resume,
    recover_answers,
    replace_answers,
    write_summary,
)
from megatron_apbv.jobs.fingerprint import job_fingerprint
from megatron_apbv.jobs.metrics import metrics_port, reset_stage_histograms
from megatron_apbv.jobs.monitor import JobMonitor
from megatron_apbv.jobs.openai_batch import OpenAIOutput
from megatron_apbv.jobs.replica import Replica
from megatron_apbv.jobs.requests import REQUEST_FORMATS, PlannedRequest, plan_requests, read_requests
from megatron_apbv.jobs.scheduler import WorkQueue, reset_job_counters
from megatron_apbv.jobs.serve import serve_pipelined, serve_serial
from megatron_apbv.runtime.config import ConfigError, RunConfig
from megatron_apbv.runtime.host_collectives import all_max, collective_device
from megatron_apbv.runtime.outputs import OutputLock


def add_arguments(parser) -> None:
    parser.add_argument("--requests", required=True, metavar="REQUESTS.jsonl",
                        help="one JSON object per line: an id plus input.*, generate.*, seed overrides")
    parser.add_argument("--output", required=True, metavar="ANSWERS.jsonl",
                        help="answers are appended here (one JSON line per request); ids answered with the same "
                             "settings are skipped (resume), answers of other settings refused")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output (an answer file) and answer every request again, whatever its "
                             "records' settings")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--requests-format", choices=REQUEST_FORMATS, default="auto",
                        help="dotted: {id, input.*, generate.*, seed}; openai: the OpenAI Batch API lines vLLM's "
                             "run-batch reads; auto (default): the first line's")
    parser.add_argument("--output-format", choices=("apbv", "openai"), default="apbv",
                        help="apbv: our records (ids, text, seconds); openai: OpenAI Batch output lines (needs "
                             "model.tokenizer)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="rank 0 serves Prometheus metrics on PORT (default: jobs.metrics_port; 0: a free port)")
    parser.add_argument("--pipeline", choices=("pipelined", "serial"), default=None,
                        help="pipelined: prefetched frames, continuous batched decoding; serial: one request after "
                             "another, stage after stage (default: jobs.pipeline)")


def prepare(args, cfg: RunConfig) -> list[PlannedRequest]:
    """Read and check the request file and the output path (every rank, before any collective).

    Rank 0 also claims the output for the job (:class:`OutputLock`); when another job holds it,
    the refusal is kept in ``args.output_claim`` and every rank raises it at the job's first
    broadcast, before any model is built.
    """
    from megatron_apbv.runtime.launch_env import LaunchEnv

    target = check_answer_outputs(args.output, args.requests)
    check_job_options(cfg, args.output_format, args.metrics_port)
    if not args.overwrite:  # every rank reads the file's fingerprints: the refusal needs no collective
        check_resume(target, job_fingerprint(cfg))
    # cheap: each request's config is resolved (its video probed) only when it is served
    planned = plan_requests(read_requests(args.requests, args.requests_format), args.config, args.overrides)
    args.output_claim = None
    if LaunchEnv.from_environ().rank == 0:
        try:
            args.output_claim = OutputLock.acquire(target, "--output", args.output)
        except ConfigError as err:
            args.output_claim = str(err)
    return planned


def check_job_options(cfg: RunConfig, output_format: str, port: Optional[int]) -> None:
    """What the output format and the metrics need is there (every rank, before any collective)."""
    if output_format == "openai" and _tokenizer_dir(cfg) is None:
        raise ConfigError(
            "--output-format openai: the answers are text, so the config needs model.tokenizer (or a "
            "model.checkpoint with tokenizer files)"
        )
    port = metrics_port(port, cfg.jobs.metrics_port)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port={port}: a TCP port is 0..65535 (0: any free port)")
    if port is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--metrics-port / jobs.metrics_port: needs the prometheus-client package (pip install "
                "prometheus-client)"
            ) from None


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


def _run_job(args, cfg: RunConfig, env, device: torch.device, stop: dict, engine: Optional[Engine] = None) -> dict:
    """The job on this rank; ``engine`` (default: built here from ``cfg``) lets a benchmark reuse one model.

    ``args`` holds the options plus what the CLI adds: ``prepared`` (:func:`prepare`), ``output_claim``
    and ``store`` (the job's store, from ``init_distributed``).
    """
    planned: list[PlannedRequest] = args.prepared

    answered: list = [None]
    if env.rank == 0:  # under the job's lock only: recover_answers may cut a torn last line off
        claim = getattr(args, "output_claim", None)
        try:
            if not isinstance(claim, OutputLock):
                raise ConfigError(claim or "--output: the job holds no lock on it")
            start = replace_answers if getattr(args, "overwrite", False) else recover_answers
            answered = [(None, sorted(start(args.output)))]
        except ConfigError as err:
            answered = [(str(err), None)]
    dist.broadcast_object_list(answered, src=0)
    refusal, answered_ids = answered[0]
    if refusal is not None:  # every rank, before the model is built
        raise ConfigError(refusal)
    # answered_before counts this job's ids only: the file may hold other jobs' records too
    done_ids = set(answered_ids) & {item.request.id for item in planned}
    pending = [item for item in planned if item.request.id not in done_ids]

    if engine is None:
        engine = Engine.build(cfg, device, vision=needs_vision(planned))
    mode = args.pipeline or cfg.jobs.pipeline
    output_format = getattr(args, "output_format", "apbv")

    fingerprint = job_fingerprint(cfg)

    def answer_file():
        writer = AnswerWriter(args.output, fingerprint)
        return OpenAIOutput(writer, _model_name(cfg)) if output_format == "openai" else writer

    served = serve_requests(pending, cfg, engine, store=args.store, mode=mode, stop=stop, sink=answer_file,
                            quiet=args.quiet,
                            port=metrics_port(getattr(args, "metrics_port", None), cfg.jobs.metrics_port))
    sums, seconds, stopped, busy_mean = served.sums, served.seconds, served.stopped, served.busy_mean
    finished = int(sums["answered"] + sums["errors"])
    summary = {
        "output": str(args.output),
        "output_format": output_format,
        "fingerprint": fingerprint,
        "overwrite": bool(getattr(args, "overwrite", False)),
        "requests": len(planned),
        "answered_before": len(done_ids),
        "answered": int(sums["answered"]),
        "errors": int(sums["errors"]),
        "remaining": len(pending) - finished,
        "stopped_by_signal": bool(stopped),
        "pipeline": mode,
        "batch_size": cfg.jobs.batch_size if mode == "pipelined" else 1,
        "prefetch_depth": cfg.jobs.prefetch_depth if mode == "pipelined" else 0,
        "prefetch_workers": cfg.jobs.prefetch_workers if mode == "pipelined" else 0,
        "world_size": env.world_size,
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "context_parallel_size": cfg.parallel.context_parallel_size,
        "tensor_parallel_size": cfg.parallel.tensor_parallel_size,
        "seconds": round(seconds, 6),
        "requests_per_second": round(finished / seconds, 4) if seconds > 0 else None,
        "prompt_tokens_per_second": round(sums["prompt_tokens"] / seconds, 2) if seconds > 0 else None,
        "generated_tokens_per_second": round(sums["generated_tokens"] / seconds, 2) if seconds > 0 else None,
        # the seconds each stage ran on the replicas' leaders, summed over the replicas; video_decode is
        # CPU time of the prefetch workers (overlapped with the GPU stages when pipelined)
        "stage_seconds": {name: round(sums[name], 6) for name in STAGES},
        # the mean over ranks of the fraction of wall time the rank's GPU had work queued (null on CPUs)
        "gpu_busy_fraction": None if busy_mean is None else round(busy_mean, 4),
    }
    if env.rank == 0:
        write_summary(args.output, summary)
        print(
            f"apbv infer: {summary['answered']} answered, {summary['errors']} errors, {summary['remaining']} remaining"
            f"{' (stopped by SIGTERM)' if stopped else ''} in {seconds:.1f} s = {summary['requests_per_second']} "
            f"req/s, {summary['generated_tokens_per_second']} generated tok/s on {summary['data_parallel_size']} "
            f"replica(s), {mode}; "
            f"GPU busy {summary['gpu_busy_fraction']}; stages (s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in summary["stage_seconds"].items()),
            file=sys.stderr,
        )
    return summary


@dataclass(frozen=True)
class Served:
    """What :func:`serve_requests` did, summed (or maxed) over every rank."""

    sums: dict  # Totals.FIELDS -> the sum over the replicas' leaders
    seconds: float  # wall seconds, the longest rank's
    stopped: bool  # SIGTERM on some rank
    busy_mean: Optional[float]  # mean GPU-busy fraction (None on CPUs)


def needs_vision(planned: list[PlannedRequest]) -> bool:
    """Whether some request has video frames (the engine then builds the vision tower): its ``input.kind``
    as written, so that no request's files are read to decide."""
    return any(p.kind == "video" for p in planned)


def serve_requests(pending: list[PlannedRequest], cfg: RunConfig, engine: Engine, *, store, mode: str, stop: dict,
                   sink: Callable[[], object], quiet: bool = True, port: Optional[int] = None) -> Served:
    """Answer ``pending`` (the same list on every rank) over every data-parallel replica: collective.

    ``store`` is the job's store (every rank's, from ``init_distributed``): the work queue and the
    counters live there, and start from zero. Each replica's leader sends its records to ``sink()``
    (made on the leaders only: an object with ``append(record)`` and ``close()``); rank 0 shows the
    progress (unless ``quiet``) and, with ``port``, serves the metrics.
    """
    group = parallel_state.get_tensor_and_context_parallel_group()
    world_device = collective_device()
    if dist.get_rank() == 0:
        reset_job_counters(store)
        reset_stage_histograms(store)
    dist.barrier()  # nobody claims before the counters are zero
    queue = WorkQueue(len(pending), group, store)
    replica = Replica(group, dist.get_world_size(group), parallel_state.get_data_parallel_rank(), queue)
    if queue.is_leader:
        replica.writer, replica.tokenizer = sink(), _tokenizer(cfg)
        replica.stage_histograms = port is not None
    monitor = None
    if dist.get_rank() == 0:
        monitor = JobMonitor(queue, len(pending), quiet=quiet, interval=cfg.jobs.progress_seconds, port=port)
    clock = StageClock(engine.device, sync_first=mode == "serial")  # from the model loaded to the last record
    try:
        if mode == "serial":
            serve_serial(replica, pending, engine, clock, stop)
        else:
            serve_pipelined(replica, pending, engine, clock, stop, cfg, cfg.jobs)
    finally:
        if replica.writer is not None:
            replica.writer.close()
        if monitor is not None:
            monitor.close()
    busy = clock.busy_fraction()
    seconds, stopped = all_max([clock.wall_seconds(), float(stop["signal"])], world_device)
    sums = replica.totals.all_sum(world_device)
    return Served(sums, seconds, bool(stopped), _all_mean(busy, world_device))


def _all_mean(value: Optional[float], device) -> Optional[float]:
    """The mean of every rank's ``value`` (None when any rank has none: CPU ranks)."""
    t = torch.tensor([value if value is not None else float("nan")], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    mean = t.item() / dist.get_world_size()
    return None if mean != mean else mean


def _tokenizer_dir(cfg: RunConfig) -> Optional[str]:
    from megatron_apbv.models.chat_prompt import has_tokenizer

    folder = cfg.model.tokenizer_dir
    return folder if folder and has_tokenizer(folder) else None


def _tokenizer(cfg: RunConfig):
    """The tokenizer that renders generated text, when the config has one."""
    from megatron_apbv.models.chat_prompt import load_tokenizer

    folder = _tokenizer_dir(cfg)
    return load_tokenizer(folder) if folder else None


def _model_name(cfg: RunConfig) -> str:
    """The ``model`` of an OpenAI output line: the checkpoint folder's name, else the tokenizer's."""
    folder = cfg.model.checkpoint or cfg.model.tokenizer_dir
    return Path(folder).name if folder else "apbv"
