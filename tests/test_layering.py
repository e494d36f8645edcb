"""The layering rule: ``megatron_apbv/runtime/`` (schema, YAML, process groups) sits below everything that
builds or serves a model, so none of its modules may import ``models``, ``inference``, ``jobs``, ``bench``
or ``eval``: not at the top, not inside a function, not through a relative import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_apbv"
ABOVE_RUNTIME = ("models", "inference", "jobs", "bench", "eval")


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, at any depth; relative imports resolved
    against the module's package (``from ..models import x`` in runtime/a.py -> megatron_apbv.models)."""
    package = ("megatron_apbv",) + path.relative_to(root).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            # ``from megatron_apbv import models`` names the package in the alias, not in the module
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
            found.append((node.lineno, module))
    return found


def upward_imports(path: Path, root: Path = PACKAGE) -> list[str]:
    """The imports of ``path`` (a module of the package at ``root``) that reach a layer above runtime/, as
    ``file:line imports module``."""
    forbidden = tuple(f"megatron_apbv.{name}" for name in ABOVE_RUNTIME)
    return [f"{path.relative_to(root.parent)}:{line} imports {module}" for line, module in imported_modules(path, root)
            if any(module == f or module.startswith(f + ".") for f in forbidden)]


def test_runtime_imports_nothing_above_it():
    modules = sorted((PACKAGE / "runtime").rglob("*.py"))
    assert len(modules) > 10  # the walk found the package, not an empty folder
    problems = [problem for path in modules for problem in upward_imports(path)]
    assert not problems, "runtime/ must not import the layers above it:\n" + "\n".join(problems)


@pytest.mark.parametrize("source", [
    "from megatron_apbv.models.video import probe_video\n",
    "def f():\n    import megatron_apbv.inference.sampling\n",
    "def f():\n    from ..jobs import answers\n",
    "from .. import eval\n",
    "from megatron_apbv import bench\n",
])
def test_the_check_sees_every_form_of_an_upward_import(tmp_path, source):
    runtime = tmp_path / "megatron_apbv" / "runtime"
    runtime.mkdir(parents=True)
    (runtime / "bad.py").write_text(source)
    assert len(upward_imports(runtime / "bad.py", tmp_path / "megatron_apbv")) >= 1


def test_imports_within_runtime_are_allowed(tmp_path):
    runtime = tmp_path / "megatron_apbv" / "runtime"
    runtime.mkdir(parents=True)
    (runtime / "ok.py").write_text("from .config import RunConfig\nfrom megatron_apbv.runtime import jsonl\n"
                                   "import torch.distributed as dist\n")
    assert upward_imports(runtime / "ok.py", tmp_path / "megatron_apbv") == []
