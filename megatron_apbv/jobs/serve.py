"""The two pipelines of ``apbv infer``: how one replica answers the requests it claims.

Both run the same stages of :class:`~megatron_apbv.inference.engine.Engine`
(video decode, vision, prefill, decode) and write the same records:

* ``serial`` (``--pipeline serial``): one request after another, each stage in
  turn, the device synchronised around each stage; decoding at batch 1
  (``apbv generate``'s path). The GPU waits while the host decodes video.
* ``pipelined`` (the default): up to ``jobs.prefetch_depth`` requests are claimed
  ahead and their frames decoded by ``jobs.prefetch_workers`` CPU threads
  (:mod:`.prefetch`) while the GPU serves earlier ones; up to ``jobs.batch_size``
  sequences decode together (:class:`~megatron_apbv.inference.slots.DecodeSlots`):
  a finished sequence's record is written at once and frees its slot, and the
  next request's prefill joins. SIGTERM: no more claims, the requests claimed but
  not started are dropped (a resume runs them), the sequences in flight finish.

Greedy answers are the same in both (each row of the batched step is computed
on its own, at the same shape).
"""

from __future__ import annotations

import sys
from typing import Callable

import torch.distributed as dist

from megatron_apbv.inference.engine import Engine, frame_share
from megatron_apbv.inference.generate import apbv_generate, decode_mode_for, stop_token_ids
from megatron_apbv.inference.prefill import apbv_prefill
from megatron_apbv.inference.slots import DecodeSlots
from megatron_apbv.inference.stage_clock import StageClock
from megatron_apbv.jobs.prefetch import Lookahead, Prepared, prepare_request
from megatron_apbv.jobs.replica import Replica
from megatron_apbv.jobs.requests import PlannedRequest
from megatron_apbv.models.inputs import Prompt
from megatron_apbv.runtime.config import JobsConfig, RunConfig
from megatron_apbv.runtime.groups import context_parallel_group, context_parallel_rank
from megatron_apbv.runtime.host_collectives import any_rank


def _share_reader() -> Callable[[RunConfig], Prompt]:
    """This rank's video-decode stage of a request's config (only its temporal share of the frames)."""
    rank, world = context_parallel_rank(), dist.get_world_size(context_parallel_group())
    return lambda cfg: Engine.read_prompt(cfg, share=frame_share(cfg, rank, world))


def serve_serial(replica: Replica, pending: list[PlannedRequest], engine: Engine, clock: StageClock, stop: dict):
    """One request after another, every stage alone; SIGTERM ends the request in flight between tokens
    (not written: the resume runs it)."""
    sink = replica.stage_sink
    read = _share_reader()
    while (index := replica.queue.next(stop["signal"])) is not None:
        item = pending[index]
        with clock.stage("video_decode", gpu=False):  # resolving the request's config (its video probe) too
            ready = prepare_request(index, item, read)
        error = replica.agree(ready.error)
        if error is not None:
            replica.write(replica.error_record(item, error))
            continue
        cfg = ready.cfg
        out = apbv_generate(cfg, engine.device, engine=engine, prompt=ready.prompt, barrier=False, clock=clock,
                            should_stop=lambda: stop["signal"])
        if out["stopped_by_signal"]:
            continue  # stays pending
        stages = {"video_decode": ready.seconds, **out["stage_seconds"]}
        for name, seconds in stages.items():
            sink[name] = sink.get(name, 0.0) + seconds
        replica.write(replica.answer_record(item, cfg, out["prompt_tokens"], out["generated_ids"][0], stages))


def grown_capacity(need: int, capacity: int, limit: int) -> int:
    """The slots' new capacity when a request needs ``need`` rows: by half again at least (a job of
    ever longer requests regrows only logarithmically often), within ``limit`` (no request exceeds it)."""
    return max(need, min(capacity + capacity // 2, limit))


def serve_pipelined(replica: Replica, pending: list[PlannedRequest], engine: Engine, clock: StageClock,
                    stop: dict, job_cfg: RunConfig, settings: JobsConfig):
    """Prefetched frames, continuous batched decoding (see the module docstring)."""
    sink = replica.stage_sink
    read = _share_reader()
    lookahead = Lookahead(
        lambda: replica.queue.next(stop["signal"]),
        lambda index: prepare_request(index, pending[index], read),
        depth=settings.prefetch_depth, workers=settings.prefetch_workers,
    )
    slots = None
    graphs = decode_mode_for(job_cfg.generate, engine.device)
    started: dict[int, tuple[RunConfig, int, dict]] = {}  # request index -> (its config, prompt tokens, stage seconds)

    def start(ready: Prepared):
        nonlocal slots
        item = pending[ready.index]
        sink["video_decode"] = sink.get("video_decode", 0.0) + ready.seconds
        error = replica.agree(ready.error)
        if error is not None:
            replica.write(replica.error_record(item, error))
            return
        cfg = ready.cfg
        stop_ids = stop_token_ids(cfg)
        run = apbv_prefill(cfg, engine.device, max_new_tokens=cfg.generate.max_new_tokens, engine=engine,
                           prompt=ready.prompt, barrier=False, clock=clock)
        for name in ("vision", "prefill"):
            sink[name] = sink.get(name, 0.0) + run.stage_seconds.get(name, 0.0)
        need = run.cache.capacity  # this rank's cached rows plus the new tokens
        with clock.stage("decode", sink):  # GPU work of the decode stage: the copy into the slot (and capture)
            if slots is None:  # the first prefill gives the cache's layer and head shapes
                slots = DecodeSlots(engine, run, slots=settings.batch_size, capacity=need, cuda_graph=graphs,
                                    group=context_parallel_group())
            elif any_rank(need > slots.capacity, replica.queue.device, replica.group):  # the group grows together
                slots.grow(grown_capacity(need, slots.capacity, cfg.model.max_position_embeddings))
            slots.join(ready.index, run, cfg.generate, seed=cfg.seed, stop_ids=stop_ids)
        started[ready.index] = (cfg, run.seq.prompt_len, {"video_decode": ready.seconds, **run.stage_seconds})

    def finish():
        for seq in slots.release_finished():
            cfg, prompt_tokens, stages = started.pop(seq.key)
            stages["decode"] = seq.decode_seconds
            replica.write(replica.answer_record(pending[seq.key], cfg, prompt_tokens, seq.ids, stages))

    def drop_claimed(popped: int = 0):
        dropped = lookahead.drop() + popped
        if replica.is_leader and not stopping["logged"]:
            stopping["logged"] = True
            active = len(slots.active) if slots is not None else 0
            print(f"apbv infer: replica {replica.index}: SIGTERM: finishing the {active} sequence(s) in flight, "
                  f"{dropped} claimed request(s) not started (a resume answers them)", file=sys.stderr, flush=True)

    stopping = {"logged": False}
    try:
        while True:
            if replica.queue.agree(stop["signal"]):
                drop_claimed()
            while slots is None or slots.has_free_slot():
                ready = lookahead.next()
                if replica.queue.stopped:  # the claim saw SIGTERM: what was claimed but not started waits
                    drop_claimed(int(ready is not None))
                    ready = None
                if ready is None:
                    break
                start(ready)
            if slots is not None:
                finish()  # one-token answers, or a first token that is a stop id
            if slots is None or not slots.active:
                if lookahead.exhausted and not lookahead.items:
                    return
                continue
            chunk: dict = {}
            with clock.stage("decode", sink, chunk):
                slots.run_chunk()
            for seq in slots.active.values():
                seq.decode_seconds += chunk["decode"]
            finish()
    finally:
        lookahead.close()
