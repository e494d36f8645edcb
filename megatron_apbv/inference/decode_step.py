"""One decode step of the whole model with static shapes, run eagerly or replayed from a CUDA graph.

A step embeds each sequence's current token, runs every layer over the
distributed cache (:class:`~megatron_apbv.apbv.decode.DecodeStep`: cache append,
decode attention, cross-rank merge), projects onto the vocabulary and takes the
greedy token, all on the device. Its inputs and outputs are fixed buffers
(``tokens``, ``positions``, ``logits``, ``greedy``) and the cache lengths advance
in place, so the same kernels with the same addresses run at every token: that
is what a CUDA graph captures once and replays. Eager and graphed steps are the
same computation.
"""

from __future__ import annotations

import torch

from megatron_apbv.apbv.decode import DecodeCache, DecodeStep
from megatron_apbv.apbv.inference_context import APBVInferenceContext
from megatron_apbv.inference.decode_layer import FusedDecodeLayers, rotary_cos_sin
from megatron_apbv.models.gpt import vocab_logits


class DecodeRunner:
    """The decode step of ``model`` over ``cache`` for one token per sequence.

    ``positions`` is ``[b]`` (1-D RoPE) or ``[3, b]`` (multimodal RoPE): the
    positions of the tokens in ``tokens`` ``[b]``; both are advanced by the step
    itself (positions), and by the caller (tokens, via :meth:`feed`).

    ``fused`` runs the layers as :class:`~megatron_apbv.inference.decode_layer.FusedDecodeLayers`
    (the Triton kernels on CUDA); ``None`` chooses it on CUDA whenever the model
    allows it (tensor parallel size 1), and Megatron's layers (torch ops) on CPU.
    :attr:`layers_path` says which one runs.
    """

    def __init__(self, model, rope, cache: DecodeCache, positions: torch.Tensor, *, cuda_graph: bool,
                 fused: bool | None = None):
        self.model, self.rope, self.cache = model, rope, cache
        device = cache.lengths.device
        if fused is None:
            fused = device.type == "cuda" and FusedDecodeLayers.unsupported(model) is None
        self.fused_layers = FusedDecodeLayers(model) if fused else None
        self.positions = positions.to(device).clone()
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.greedy: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            self._capture()

    @property
    def mode(self) -> str:
        return "cuda_graph" if self.graph is not None else "eager"

    @property
    def layers_path(self) -> str:
        return "fused" if self.fused_layers is not None else "megatron"

    def feed(self, tokens: torch.Tensor) -> None:
        """The tokens the next step embeds (one per sequence)."""
        self.tokens.copy_(tokens)

    def step(self) -> None:
        """Run one step: ``logits`` ``[b, vocab]`` fp32 and ``greedy`` ``[b]`` hold its result."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward()

    def _forward(self) -> None:
        model = self.model
        step = DecodeStep.begin(self.cache, new_tokens=1)
        rotary = self.rope.per_sequence(self.positions[..., None])
        hidden = model.embedding(input_ids=self.tokens[:, None], position_ids=None)
        if self.fused_layers is not None:
            cos, sin = rotary_cos_sin(rotary)
            hidden = self.fused_layers.forward(hidden, step, cos, sin)
        else:
            hidden = model.decoder(hidden_states=hidden, attention_mask=APBVInferenceContext.decode(step),
                                   rotary_pos_emb=rotary)
        logits = vocab_logits(model, hidden)
        step.commit()
        self.positions.add_(1)
        if self.logits is None:
            self.logits, self.greedy = logits, logits.argmax(-1)
        else:
            self.logits.copy_(logits)
            self.greedy.copy_(logits.argmax(-1))

    def _capture(self) -> None:
        """Warm up on a side stream (compiles the kernels), then capture one step; the state is left as found.

        The warm-up writes the new keys at each sequence's length, which is past
        the valid rows: the first real step overwrites them.
        """
        saved = (self.cache.lengths.clone(), self.positions.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
            self._restore(saved)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the job's prefetch threads may run (CPU-only) work meanwhile; only this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._forward()
        self._restore(saved)  # capture records without running, but leave no doubt
        torch.cuda.synchronize()

    def _restore(self, saved) -> None:
        self.cache.lengths.copy_(saved[0])
        self.positions.copy_(saved[1])
