"""Per-request inference state of an APB-V forward, kept apart from the mask's settings (docs/design.md §5).

:class:`~megatron_apbv.apbv.attention.APBVMask` says how a prompt is attended
(layout, budgets, scoring): settings, the same for every request of that shape.
What belongs to one request — the KV cache its prefill fills, the step of its
decoding — is an :class:`APBVInferenceContext`, the role Megatron's
``BaseInferenceContext`` (``megatron.core.inference.contexts``) plays for its
own attention.

It is not one of Megatron's contexts on purpose: given as ``inference_context=``,
Megatron's ``Attention`` would keep its own KV cache and hand the core attention
the whole local cache, where APB-V's cache is split across ranks and merged by
log-sum-exp; and ``inference_context`` never reaches the core attention. The
one argument Megatron's ``SelfAttention`` passes to its core attention unchanged
on every call is ``attention_mask``, so the context travels there, carrying the
mask with it (``attention_mask=APBVInferenceContext(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from megatron_apbv.apbv.decode import DecodeStep, DistributedKVCache

if TYPE_CHECKING:
    from megatron_apbv.apbv.attention import APBVMask


@dataclass(frozen=True)
class APBVInferenceContext:
    """One forward's request state on this rank, given to every APB-V layer with the call.

    * prefill (:meth:`prefill`): ``mask`` (the settings) and ``prefill_cache``,
      where each layer stores the rows of its own K/V that decoding reads;
    * decode step (:meth:`decode`): ``step`` only — exact attention over the
      distributed cache, whose lengths are all the mask there is.
    """

    mask: Optional["APBVMask"] = None
    prefill_cache: Optional[DistributedKVCache] = None
    step: Optional[DecodeStep] = None

    def __post_init__(self):
        if (self.mask is None) == (self.step is None):
            raise ValueError("APBVInferenceContext: give a mask (prefill) or a step (decode), exactly one of them")
        if self.prefill_cache is not None and self.step is not None:
            raise ValueError("APBVInferenceContext: a decode step reads the cache it holds; prefill_cache is "
                             "for the prefill that fills it")

    @classmethod
    def prefill(cls, mask: "APBVMask", cache: DistributedKVCache) -> "APBVInferenceContext":
        """A prefill under ``mask`` that leaves this rank's K/V in ``cache`` (decoding follows)."""
        return cls(mask=mask, prefill_cache=cache)

    @classmethod
    def decode(cls, step: DecodeStep) -> "APBVInferenceContext":
        """A decode step: the new tokens of ``step`` over its cache."""
        return cls(step=step)

    def is_decode_only(self) -> bool:
        """Whether this forward decodes (Megatron's contexts ask the same question by this name)."""
        return self.step is not None
