"""megatron_apbv/eval/budget_choice.py: the cheapest deployable budget within 2 points of dense everywhere."""

import json

import pytest

from megatron_apbv.eval.budget_choice import choose, main


def _row(task, length, w, method, rule, anchor, passing, acc, cost, keys, deployable=True):
    return dict(task=task, length=length, W=w, method=method, rule=rule, anchor=anchor, passing=passing,
                accuracy=acc, predicted_prefill_s=cost, keys_per_row=keys, deployable=deployable)


def _sweep():
    rows = []
    for task in ("passkey", "multikey"):
        for n in (4096, 8000):
            rows.append(_row(task, n, None, "dense", "-", "-", "-", 0.90, 19.7, 4000))
            for w in (2, 4, 8):
                # the paper's rule loses 10 points at W = 8, 8K: it does not qualify
                rows.append(_row(task, n, w, "apbv", "mean", "paper", "paper", 0.80 if (w, n) == (8, 8000) else 0.90,
                                 1.20, 300))
                # a quarter of the block: 1.5 points below dense at worst: qualifies, 1.45 s
                rows.append(_row(task, n, w, "apbv", "mean", "paper", "{block: 0.25}", 0.885, 1.45, 600))
                # twice the paper: cheaper (1.34 s) and within 2 points, but one (task, length, W) is missing
                if (task, n, w) != ("multikey", 8000, 8):
                    rows.append(_row(task, n, w, "apbv", "mean", "paper", "{paper: 2}", 0.90, 1.34, 450))
                # the query-aware anchor: qualifies and is the cheapest, but the distributed code lacks it
                rows.append(_row(task, n, w, "apbv", "mean", "query_aware paper", "paper", 0.90, 1.20, 300, False))
                rows.append(_row(task, n, w, "star", "-", "paper", "0", 0.30, 0.9, 200))
    return {"rows": rows}


def test_cheapest_deployable_within_two_points_everywhere():
    out = choose(_sweep())
    assert (out["chosen"]["rule"], out["chosen"]["anchor"], out["chosen"]["passing"]) == \
        ("mean", "paper", "{block: 0.25}")
    assert out["chosen"]["worst_gap"] == pytest.approx(0.015)
    assert out["best_including_oracle_only"]["anchor"] == "query_aware paper"
    table = {(c["rule"], c["anchor"], c["passing"]): c for c in out["candidates"]}
    paper = table[("mean", "paper", "paper")]
    assert not paper["qualifies"] and paper["worst_gap"] == pytest.approx(0.10) and paper["worst_at"][2] == 8
    twice = table[("mean", "paper", "{paper: 2}")]
    assert not twice["qualifies"] and twice["missing"] == [["multikey", 8000, 8]]
    assert ("-", "paper", "0") not in table  # Star is reported beside, never a candidate


def test_nothing_qualifies_exits_1_and_a_bad_file_exits_2(tmp_path, capsys):
    sweep = _sweep()
    sweep["rows"] = [r for r in sweep["rows"] if r["passing"] != "{block: 0.25}"]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    assert main([str(path), "--tolerance", "0.02"]) == 1
    assert json.loads(capsys.readouterr().out)["chosen"] is None
    assert main([str(path), "--tolerance", "0.10"]) == 0  # the paper's rule is within 10 points
    assert json.loads(capsys.readouterr().out)["chosen"]["passing"] == "paper"
    path.write_text(json.dumps({"rows": [r for r in sweep["rows"] if r["method"] != "dense"]}))
    assert main([str(path)]) == 2
    assert "no dense rows" in capsys.readouterr().err
