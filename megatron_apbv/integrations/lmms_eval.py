"""An lmms-eval model backed by the APB-V engine: ``lmms-eval --model apbv --model_args config=...``.

Install with the ``[eval]`` extra; the package's ``lmms_eval.models`` entry point (setup.py)
registers the model id ``apbv`` the way lmms-eval loads plugin models (a ``ModelManifest``),
so lmms-eval's own tasks, prompts and scoring run unchanged. Launch lmms-eval under torchrun
with the ranks the config asks for (``parallel.*``), e.g.::

    torchrun --nproc_per_node 2 -m lmms_eval --model apbv \\
        --model_args "config=configs/qwen25vl_3b.yaml,overrides=apbv.variant=apbv;generate.max_new_tokens=64" \\
        --tasks videomme --batch_size 1

``model_args``: ``config`` (the YAML), ``overrides`` (``key=value`` items separated by ``;``) and
``pipeline`` (``serial`` or ``pipelined``). The config needs ``model.tokenizer`` (questions are text).

lmms-eval gives each rank its share of the documents; the engine answers every rank's share
together (one collective :meth:`RequestEngine.generate`) and each rank gets its own answers
back. A document becomes one request: its context is ``input.question``, its one video (a local
path) ``input.video_path``; ``max_new_tokens``, ``temperature`` and ``top_p`` of the task's
generation kwargs are honoured, and the answer is cut at the first of its ``until`` strings (as
lmms-eval's own models do). Images, several videos per document and log-likelihood tasks are not
supported: they raise with the document named.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from megatron_apbv.jobs.request_engine import RequestEngine
from megatron_apbv.runtime.config import ConfigError

MODEL_ID = "apbv"
_GENERATION_KEYS = {"max_new_tokens": "generate.max_new_tokens", "temperature": "generate.temperature",
                    "top_p": "generate.top_p"}
# lmms-eval's generation kwargs that change nothing here (HF-generate switches and bookkeeping)
_NEUTRAL_KEYS = {"until", "do_sample", "num_beams", "use_cache", "image_aspect_ratio"}


def manifests():
    """The ``lmms_eval.models`` entry point: lmms-eval's registry calls it for the model id ``apbv``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.APBVModel")]


class APBVModel(lmms):
    """lmms-eval's ``generate_until`` over :class:`~megatron_apbv.jobs.request_engine.RequestEngine`."""

    is_simple = True

    def __init__(self, config: Optional[str] = None, overrides: str = "", pipeline: Optional[str] = None,
                 engine: Optional[RequestEngine] = None, **unused) -> None:
        super().__init__()
        if unused:  # lmms-eval passes batch_size, device (the engine's config decides both)
            unused.pop("batch_size", None), unused.pop("device", None)
        if unused:
            raise ConfigError(f"--model_args: unknown {', '.join(sorted(unused))}; apbv takes config, overrides, "
                              "pipeline")
        items = [item.strip() for item in str(overrides or "").split(";") if item.strip()]
        self.engine = engine or RequestEngine.load(config, items, vision=True)
        self.pipeline = pipeline
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    @property
    def device(self):
        """The engine's device (lmms-eval's torchrun path puts its counting tensors there)."""
        return self.engine.engine.device

    def request_of(self, instance: Instance, key: str) -> tuple[dict, list[str]]:
        """One lmms-eval instance -> (our request dict, its ``until`` strings)."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        where = f"lmms-eval task {task!r} document {doc_id!r}"
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        request = {"id": key, "input.question": context}
        if len(visuals) > 1:
            raise ConfigError(f"{where}: {len(visuals)} visuals; apbv answers one video per request")
        if visuals:
            if not isinstance(visuals[0], str):
                raise ConfigError(f"{where}: the visual is a {type(visuals[0]).__name__}, not a video path: images "
                                  "are not supported")
            request.update({"input.kind": "video", "input.video_path": visuals[0]})
        gen_kwargs = dict(gen_kwargs or {})
        for name, value in gen_kwargs.items():
            if name in _GENERATION_KEYS:
                request[_GENERATION_KEYS[name]] = value
            elif name not in _NEUTRAL_KEYS:
                raise ConfigError(f"{where}: generation kwarg {name!r} is not supported by apbv")
        until = gen_kwargs.get("until") or []
        return request, [until] if isinstance(until, str) else list(until)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Every rank's share answered together; this rank's answers in its order."""
        mine = [self.request_of(instance, f"{self._rank}:{i}") for i, instance in enumerate(requests)]
        shares: list = [None] * self._world_size
        dist.all_gather_object(shares, [request for request, _ in mine])
        everyone = [request for share in shares for request in share]
        records = self.engine.generate(everyone, pipeline=self.pipeline) if everyone else []
        answers = {record["id"]: record for record in records}
        texts = []
        for request, until in mine:
            record = answers[request["id"]]
            if "error" in record:
                raise ConfigError(f"apbv could not answer {request['id']}: {record['error']}")
            text = record["generated_text"]
            for stop in until:
                if stop:
                    text = text.split(stop, 1)[0]
            texts.append(text)
        return texts

    def loglikelihood(self, requests):
        raise NotImplementedError("apbv answers generation tasks (generate_until); log-likelihood tasks are not "
                                  "supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("apbv answers one question per document; multi-round tasks are not supported")
