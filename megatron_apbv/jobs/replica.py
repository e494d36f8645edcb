"""One data-parallel replica of ``apbv infer``: its group, its verdicts, its records and its totals.

Both pipelines (:mod:`.serve`) answer requests through a :class:`Replica`: every
rank of the replica learns every rank's verdict on a request before the first
collective on it (:meth:`Replica.agree`), and the replica's leader writes the
record, counts it in the job's store (rank 0's progress and metrics read it there) and adds it to the
job's totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_apbv.inference.engine import STAGES
from megatron_apbv.inference.generate import stop_token_ids
from megatron_apbv.jobs.metrics import observe_stages
from megatron_apbv.jobs.requests import PlannedRequest
from megatron_apbv.runtime.config import RunConfig


class Totals:
    """What a leader answered, and the seconds its stages ran, as one vector the replicas sum."""

    FIELDS = ("answered", "errors", "prompt_tokens", "generated_tokens") + STAGES

    def __init__(self):
        self.values = dict.fromkeys(self.FIELDS[:4], 0.0)
        self.stages = dict.fromkeys(STAGES, 0.0)  # filled by the pipeline (a StageClock sink on the leader)

    def add(self, record: dict) -> None:
        if "error" in record:
            self.values["errors"] += 1
            return
        self.values["answered"] += 1
        self.values["prompt_tokens"] += record["prompt_tokens"]
        self.values["generated_tokens"] += len(record["generated_ids"])

    def all_sum(self, device) -> dict:
        values = {**self.values, **self.stages}
        t = torch.tensor([values[k] for k in self.FIELDS], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(self.FIELDS, t.tolist()))


@dataclass
class Replica:
    """This rank's view of its replica; ``writer``/``tokenizer`` are set on the leader only."""

    group: object  # the APB-V (TP x CP) group of the replica
    size: int
    index: int  # the replica's data-parallel rank
    queue: object  # WorkQueue
    writer: object = None  # where the leader's records go: append(record), close() (an AnswerWriter, a list)
    tokenizer: object = None  # renders generated text (leader, when the config has one)
    stage_histograms: bool = False  # the leader adds each answer's stage seconds to the job's metrics
    totals: Totals = field(default_factory=Totals)

    @property
    def is_leader(self) -> bool:
        return self.writer is not None

    @property
    def stage_sink(self) -> dict:
        """Where the pipeline adds stage seconds: the totals on the leader, a scratch dict elsewhere."""
        return self.totals.stages if self.is_leader else {}

    def agree(self, error: Optional[str]) -> Optional[str]:
        """The first rank's error of the replica (None when every rank is fine): the same verdict everywhere."""
        if self.size == 1:
            return error
        verdicts: list = [None] * self.size
        dist.all_gather_object(verdicts, error, group=self.group)
        failed = [(rank, e) for rank, e in enumerate(verdicts) if e is not None]
        if not failed:
            return None
        rank, message = failed[0]
        return message if rank == 0 or message == verdicts[0] else f"{message} (on rank {rank} of the replica)"

    def error_record(self, item: PlannedRequest, error: str) -> dict:
        return {"id": item.request.id, "error": error, "replica": self.index}

    def answer_record(self, item: PlannedRequest, cfg: RunConfig, prompt_tokens: int, ids: list[int],
                      stages: dict) -> dict:
        """The record of ``item`` answered with ``cfg`` (its resolved config)."""
        record = {
            "id": item.request.id,
            "replica": self.index,
            "prompt_tokens": prompt_tokens,
            "anchor_len": cfg.anchor_len,
            "passing_lens": list(cfg.passing_lens()),
            "generated_ids": ids,
            # OpenAI's finish_reason: a stop id ended it, or it ran to generate.max_new_tokens
            "finish_reason": "stop" if ids and (len(ids) < cfg.generate.max_new_tokens
                                                or ids[-1] in stop_token_ids(cfg)) else "length",
        }
        if self.tokenizer is not None:
            record["generated_text"] = self.tokenizer.decode(ids, skip_special_tokens=True)
        record["seconds"] = {name: round(stages.get(name, 0.0), 6) for name in STAGES}
        return record

    def write(self, record: dict) -> None:
        """Leader: append the record, count it (and its stage seconds, with metrics on)."""
        if self.writer is not None:
            self.writer.append(record)
            if self.stage_histograms and "error" not in record:
                observe_stages(self.queue.store, record["seconds"])
            self.queue.finished("error" in record, len(record.get("generated_ids", ())))
            self.totals.add(record)
