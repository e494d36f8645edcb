"""The Triton kernels of ``kernels/`` imported as a private package, for runs under ``TRITON_INTERPRET=1``.

``kernels/`` is a namespace package (no ``__init__.py``): a package object over that folder, under a
private name, keeps the interpreted copy apart from ``megatron_apbv.kernels``. Its attributes are the
kernels' public functions (each module's ``__all__``); the modules are in ``sys.modules`` under it.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
MODULES = ("apb_attention", "decode_attention", "decode_step", "lse_merge", "passing_scores")


def load_interpreted_kernels(name: str) -> types.ModuleType:
    """The package ``name`` over ``kernels/`` (made once per process)."""
    if name in sys.modules:
        return sys.modules[name]
    package = types.ModuleType(name)
    package.__path__ = [str(KERNELS)]
    sys.modules[name] = package
    loaded = [importlib.import_module(f"{name}.{module}") for module in MODULES]
    for module in loaded:  # after every import: a function may share its module's name (passing_scores)
        for attr in module.__all__:
            setattr(package, attr, getattr(module, attr))
    return package
