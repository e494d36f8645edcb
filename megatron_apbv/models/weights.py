"""Where a model's parameters come from: a checkpoint, or seeded random values, without a wasted pass.

Megatron's random initialisation of a 7 B model on the CPU takes about a minute.
A model that is about to be overwritten by a checkpoint needs none: it is built
on the meta device (no memory, no initialisation) and its storage is allocated
directly on the target device, then filled by the loader. Random weights on a
GPU are drawn there from a seeded generator. CPU runs without a checkpoint keep
Megatron's CPU initialisation: every rank and every test draws the same numbers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch


def initialise_on_build(checkpoint: str | None, device: torch.device) -> bool:
    """Whether Megatron initialises the parameters while building (only CPU runs with random weights)."""
    return checkpoint is None and device.type == "cpu"


@contextmanager
def build_device(initialise: bool):
    """Build on the CPU when Megatron initialises, else on the meta device (allocates nothing)."""
    if initialise:
        yield
    else:
        with torch.device("meta"):
            yield


def materialise(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Storage for a meta-built ``model`` on ``device``, uninitialised (a loader or :func:`randomise` fills it)."""
    return model.to_empty(device=device)


@torch.no_grad()
def randomise(model: torch.nn.Module, *, seed: int, std: float, num_layers: int) -> None:
    """Seeded random weights drawn on the parameters' device, with Megatron's scheme.

    Norm weights 1, biases 0, other weights normal(0, ``std``), and the two
    projections back into the residual stream (``linear_proj``, ``linear_fc2``)
    normal(0, ``std / sqrt(2 * num_layers)``), as Megatron's ``output_layer_init_method``.
    Each parameter draws from a generator seeded by ``seed`` and its position in
    the model, so models built from one config (e.g. APB-V and dense) agree.
    """
    scaled = std / math.sqrt(2.0 * num_layers)
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + index)
            sigma = scaled if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
            param.normal_(0.0, sigma, generator=generator)
