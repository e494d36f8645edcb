"""Choosing the next token from the logits: repetition penalty, then greedy or temperature / top-k / top-p sampling.

The semantics are those of Hugging Face ``generate`` (its logits processors, in
its order): the repetition penalty divides the logits of every id already in the
sequence (prompt and generated) by the penalty when positive and multiplies them
when negative; sampling divides by the temperature, keeps the ``top_k`` largest
logits (ties with the k-th kept), then the smallest set of most likely ids whose
probability reaches ``top_p``, and draws from what is left. Temperature 0 is
greedy (after the penalty). Everything runs on the logits' device from a seeded
generator on that device.

Defaults: a ``generate`` key left null takes the checkpoint's
``generation_config.json`` value (:func:`~megatron_apbv.models.hf_config.checkpoint_sampling_defaults`,
applied by :func:`~megatron_apbv.models.resolve.load_config`), else temperature 0, top_p 1, top_k 0 (off), penalty 1.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_apbv.models.hf_config import SAMPLING_KEYS
from megatron_apbv.runtime.config import GenerateConfig

NEUTRAL = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


class Sampler:
    """Next ids from logits with ``settings`` (a ``GenerateConfig``), seeded by ``seed``.

    ``prompt_ids`` ``[b, N]`` (or a list of them, for rows of different prompt lengths) start the
    repetition-penalty history; every id the
    sampler returns joins it. The generator lives on the logits' device (made at
    the first call).
    """

    def __init__(self, settings: GenerateConfig, seed: int, prompt_ids: Optional[torch.Tensor] = None):
        self.temperature, self.top_p, self.top_k, self.penalty = (
            NEUTRAL[k] if getattr(settings, k) is None else getattr(settings, k) for k in SAMPLING_KEYS
        )
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        self.prompt_ids = prompt_ids
        self.seen: Optional[torch.Tensor] = None  # [b, vocab] bool: ids in the sequence so far

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """float64 logits after the penalty, temperature, top-k and top-p (filtered ids at -inf)."""
        scores = logits.to(torch.float64)
        if self.penalty != 1.0:
            seen = self._seen(logits)
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(seen, penalised, scores)
        if self.temperature == 0:
            return scores
        scores = scores / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            # drop an id when the ids more likely than it already reach top_p (the first is always kept)
            drop = probs.cumsum(-1) - probs >= self.top_p
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next ids ``[b]`` from logits ``[b, vocab]``."""
        scores = self.scores(logits)
        if self.temperature == 0:
            ids = scores.argmax(-1)
        else:
            if self.generator is None:
                self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
            ids = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[:, 0]
        if self.seen is not None:
            self.seen.scatter_(1, ids[:, None], True)
        return ids

    def _seen(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen is None:
            self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            if self.prompt_ids is not None:  # one [b, N] tensor, or one per group of rows (different N)
                chunks = self.prompt_ids if isinstance(self.prompt_ids, (list, tuple)) else [self.prompt_ids]
                row = 0
                for prompt in chunks:
                    prompt = prompt.to(logits.device)
                    rows = logits.shape[0] if len(chunks) == 1 else prompt.shape[0]
                    self.seen[row : row + rows].scatter_(1, prompt.expand(rows, -1), True)
                    row += rows
        return self.seen
