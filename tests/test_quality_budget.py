"""benchmarks/quality_budget.py's arithmetic: keys per context row against the reference's explicit mask; the grid."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from megatron_apbv.apbv.reference import apbv_block_bounds_reference, apbv_mask_reference

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_budget.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("quality_budget", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n,a,q,w,p", [(200, 16, 8, 2, 5), (157, 0, 3, 4, 0), (300, 20, 10, 3, 1000)])
def test_keys_per_row_counts_the_reference_mask(bench, n, a, q, w, p):
    g = torch.Generator().manual_seed(0)
    qs, ks = torch.randn(n, 2, 4, generator=g), torch.randn(n, 1, 4, generator=g)
    mask = apbv_mask_reference(qs, ks, world_size=w, anchor_len=a, query_len=q, passing_len=p)[0]
    rows = torch.cat([torch.arange(s, e) for s, e in apbv_block_bounds_reference(n, world_size=w, anchor_len=a,
                                                                                  query_len=q)])
    assert bench.keys_per_row(n, a, q, w, p) == pytest.approx(float(mask[rows].sum(-1).double().mean()))
    assert bench.keys_per_row(n, a, q, w, None) == pytest.approx(float((rows + 1).double().mean()))


def test_grid_holds_every_rule_the_budgets_of_the_issue_and_star(bench):
    full, small = bench.grid("full"), bench.grid("small")
    assert len(full) == 29 and len(small) == 14  # a W of the sweep: 3 x 29 + dense per (task, length)
    labels = {(p["rule"], bench.label(p["anchor"]), bench.label(p["passing"]), p["query_aware"]) for p in full}
    for passing in ("paper", "{paper: 2}", "{paper: 4}", "{block: 0.125}", "{block: 0.25}", "{block: 0.5}"):
        assert ("mean", "paper", passing, False) in labels
    assert {p["rule"] for p in full if p["method"] == "apbv"} == set(bench.RULES)
    assert ("mean", "{paper: 2}", "paper", False) in labels and ("mean", "paper", "paper", True) in labels
    assert [p["passing"] for p in full if p["method"] == "star"] == [0]
    assert math.isclose(bench.PaperSettingCost().predict("apbv", "paper", "paper")["anchor"], 2432)
