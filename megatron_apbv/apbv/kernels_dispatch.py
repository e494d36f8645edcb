"""Which implementation runs an operation: the Triton kernels for CUDA tensors, the torch code for CPU tensors.

The torch functions in this package define each operation; ``megatron_apbv.kernels``
implements the same functions for CUDA tensors. There is no silent fallback: a
CUDA tensor whose kernel cannot be loaded raises :class:`KernelUnavailable`
(the torch path builds ``O(N^2)`` masks, out of memory or minutes per layer at
long prompts). ``APBV_DISABLE_KERNELS=1`` is the one explicit way to run the
torch path on a GPU (useful to compare the two).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

DISABLE_ENV = "APBV_DISABLE_KERNELS"


class KernelUnavailable(RuntimeError):
    """CUDA tensors met a kernel that cannot be loaded; the message names the missing piece and the fix."""


def kernels_disabled() -> bool:
    """True when ``APBV_DISABLE_KERNELS=1`` asks for the torch path on every device."""
    return os.environ.get(DISABLE_ENV) == "1"


# Each kernel and the module of ``kernels/`` (installed as the namespace package ``megatron_apbv.kernels``) that
# defines it. ``kernels/`` has no ``__init__.py`` on purpose: a regular package of that name at the repository
# root would shadow PyPI's ``kernels`` (which transformers imports) whenever the root is on ``sys.path``.
KERNEL_MODULES = {
    "apb_attention": "apb_attention",
    "decode_attention": "decode_attention",
    "decode_add_rms_norm": "decode_step",
    "decode_qkv_rope_append": "decode_step",
    "merge_pair": "lse_merge",
    "merge_partials": "lse_merge",
    "passing_scores": "passing_scores",
    "select_passing": "passing_scores",
    "vision_bias_rms_norm": "vision_elementwise",
    "vision_rope_qk_": "vision_elementwise",
    "vision_silu_mul": "vision_elementwise",
}


@functools.lru_cache(maxsize=None)
def _load_kernel_module(module: str):
    """``(module, None)`` or ``(None, reason)``: each import is tried once per process."""
    try:
        return importlib.import_module(f"megatron_apbv.kernels.{module}"), None
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        if missing in ("triton", "triton.language") or "triton" in str(exc):
            return None, "Triton is not installed: pip install triton"
        return None, (
            f"megatron_apbv.kernels.{module} cannot be imported ({exc}): reinstall the package (pip install .) so "
            "that kernels/ is importable as megatron_apbv.kernels"
        )


def kernel_for(name: str, tensor: torch.Tensor):
    """The kernel ``name`` for a CUDA ``tensor``; None for CPU tensors or with ``APBV_DISABLE_KERNELS=1``.

    Raises :class:`KernelUnavailable` when ``tensor`` is on CUDA and the kernel
    module (or the kernel) cannot be loaded.
    """
    if not tensor.is_cuda or kernels_disabled():
        return None
    if name not in KERNEL_MODULES:
        raise KeyError(f"no kernel named {name!r}; kernels: {', '.join(sorted(KERNEL_MODULES))}")
    module, reason = _load_kernel_module(KERNEL_MODULES[name])
    kernel = getattr(module, name, None) if module is not None else None
    if kernel is None:
        reason = reason or f"megatron_apbv.kernels.{KERNEL_MODULES[name]} has no kernel {name!r}: reinstall the package"
        raise KernelUnavailable(
            f"{name} on CUDA tensors needs the Triton kernels. {reason}; or set {DISABLE_ENV}=1 to use the slow "
            "torch path (O(N^2) masks)"
        )
    return kernel
