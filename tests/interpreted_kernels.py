"""The Triton kernels of ``kernels/`` imported as a private package, for runs under ``TRITON_INTERPRET=1``.

``kernels/`` is a namespace package (no ``__init__.py``): a package object over that folder, under a
private name, keeps the interpreted copy apart from ``megatron_apbv.kernels``. Its attributes are the
kernels' public functions (each module's ``__all__``); the modules are in ``sys.modules`` under it.

``rerun_under_interpreter`` is a kernel test module's outer entry: the module again, in a subprocess with
``TRITON_INTERPRET=1`` (``triton.jit`` picks interpreter or compiler at decoration time, so the variable
must be set before Triton is imported, and must not leak into the other test modules of this process).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
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


def rerun_under_interpreter(test_file, *pytest_args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``pytest -q test_file *pytest_args`` in a subprocess with ``TRITON_INTERPRET=1``, from the repository root.

    Skips inside that subprocess (the outer entry has nothing to do there) and where Triton cannot be
    imported; the caller asserts on the finished process (its return code, its counts of passed tests).
    """
    if IN_INTERPRETER:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), *pytest_args],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)
