"""Per-method facts live in the registry: no module outside it decides by comparing method names.

``megatron_apbv/methods.py`` (and the core-attention classes it names) hold what
differs between methods; every other module asks an entry (``get_method(name).setting``,
``.fixed_passing``, ``REFERENCE``, ...). This test parses the package and fails on any
comparison (``==``, ``!=``, ``in``, ``not in``, ``match`` case) against a string that
is a registered method name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import megatron_apbv
from megatron_apbv.methods import METHODS

PACKAGE = Path(megatron_apbv.__file__).parent
# The registry and the method classes it names: where per-method facts belong.
OWNERS = {"methods.py"} | {
    str(Path(*m.core_attention.partition(":")[0].split(".")[1:])) + ".py" for m in METHODS.values()
}
# Comparisons whose string only spells a method's name: (file, source of the compared expression).
NOT_METHOD_NAMES = {
    ("jobs/request_engine.py", "output_format"),  # the response format called "apbv" (or "openai")
}


def _names(node: ast.AST) -> list[str]:
    """The registered method names a compared operand spells (a string, or a tuple/list/set of them)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str) and i.value in METHODS]


def method_name_comparisons(source: str, path: str = "<string>") -> list[str]:
    """``path:line: text`` of every comparison in ``source`` against a registered method name."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(operands):
                others = [ast.get_source_segment(source, o) for j, o in enumerate(operands) if j != i]
                if _names(op) and not any((path, o) in NOT_METHOD_NAMES for o in others):
                    found.append(f"{path}:{node.lineno}: {ast.get_source_segment(source, node)}")
                    break
        elif isinstance(node, ast.Match):
            subject = ast.get_source_segment(source, node.subject)
            for case in node.cases:
                for pattern in ast.walk(case.pattern):
                    if isinstance(pattern, ast.MatchValue) and _names(pattern.value) \
                            and (path, subject) not in NOT_METHOD_NAMES:
                        found.append(f"{path}:{pattern.lineno}: case {ast.get_source_segment(source, pattern)}")
    return found


def test_owners_exist():
    # a renamed module must not silently widen what the scan skips
    assert OWNERS >= {"methods.py", "apbv/attention.py", "baselines/dense.py"}
    for rel in OWNERS:
        assert (PACKAGE / rel).is_file(), rel


def test_scanner_catches_name_comparisons():
    bad = '''
if method == "star":
    pass
zig = variant != "apb_like"
ok = name in ("ring", "other")
match method:
    case "ulysses":
        pass
fmt = output_format == "openai"
ask = get_method(method).setting("zigzag")
'''
    hits = method_name_comparisons(bad)
    assert sorted(int(h.split(":")[1]) for h in hits) == [2, 4, 5, 7], hits
    assert method_name_comparisons('if output_format == "apbv": pass', "jobs/request_engine.py") == []
    assert len(method_name_comparisons('if output_format == "apbv": pass', "bench/e2e.py")) == 1


def test_no_module_compares_method_names():
    found = []
    scanned = sorted(PACKAGE.rglob("*.py"))
    assert len(scanned) > 50 and any(p.name == "predict.py" for p in scanned)  # the package, not an empty folder
    for path in scanned:
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in OWNERS:
            found += method_name_comparisons(path.read_text(), rel)
    assert not found, "ask megatron_apbv.methods instead of comparing method names:\n" + "\n".join(found)
