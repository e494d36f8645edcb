"""Choose the Triton kernel for CUDA tensors, the torch code for everything else.

The torch functions in this package define each operation; ``megatron_apbv.kernels``
implements the same functions for CUDA tensors. ``APBV_DISABLE_KERNELS=1`` forces
the torch path everywhere (useful to compare the two on a GPU).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch


@functools.lru_cache(maxsize=None)
def _kernels():
    if os.environ.get("APBV_DISABLE_KERNELS") == "1":
        return None
    try:
        return importlib.import_module("megatron_apbv.kernels")
    except ImportError:
        return None


def kernel_for(name: str, tensor: torch.Tensor):
    """The kernel ``name`` if ``tensor`` lives on a CUDA device and the kernel exists, else None."""
    if not tensor.is_cuda:
        return None
    module = _kernels()
    return getattr(module, name, None) if module is not None else None
