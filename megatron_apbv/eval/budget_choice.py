"""Choose APB-V's default budgets from the accuracy-cost sweep (issue 34, issue 30 item 4).

The rule, applied to ``benchmarks/results/quality_budget_smollm2.json`` (benchmarks/quality_budget.py):

1. A candidate is one (selection rule, anchor budget, passing budget) of method ``apbv``; only
   ``deployable`` ones (the distributed code runs them: not the oracle-only query-aware anchor) may
   become the default, the others are reported beside.
2. It qualifies when, at EVERY (task, length, W) the sweep measured, its accuracy is at least dense's
   accuracy at that (task, length) minus ``tolerance`` (2 points: 0.02); a candidate missing any of
   those points does not qualify.
3. Among the qualifying, the cheapest wins: lowest predicted prefill at the paper's setting
   (``predicted_prefill_s``), then fewest keys per context row (summed over the points), then the
   paper's rule before any other (a tie keeps what the paper does).

The winner's ``anchor`` and ``passing`` are written into ``AUTO_BUDGETS`` (runtime/config.py) and its
rule into ``apbv.selection``'s default: one line each. ``python -m megatron_apbv.eval.budget_choice
RESULTS.json`` prints the choice and every candidate's worst gap to dense as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_apbv.methods import REFERENCE, SERVED

TOLERANCE = 0.02


def choose(record: dict, *, tolerance: float = TOLERANCE) -> dict:
    """The choice (see the module docstring) from a sweep record; ``chosen`` is None when nothing qualifies."""
    rows = record["rows"]
    dense = {(r["task"], r["length"]): r["accuracy"] for r in rows if r["method"] == REFERENCE}
    settings = sorted({(r["task"], r["length"], r["W"]) for r in rows if r["method"] == SERVED})
    if not dense or not settings:
        raise ValueError("the sweep has no dense rows or no apbv rows: nothing to choose from")
    missing_dense = sorted({(t, n) for t, n, _ in settings} - set(dense))
    if missing_dense:
        raise ValueError(f"no dense row for {missing_dense}: the gap to dense is undefined there")
    candidates: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] != SERVED:
            continue
        key = (r["rule"], r["anchor"], r["passing"])
        c = candidates.setdefault(key, {"rule": r["rule"], "anchor": r["anchor"], "passing": r["passing"],
                                        "deployable": r.get("deployable", True), "points": {}})
        c["points"][(r["task"], r["length"], r["W"])] = r
    table = []
    for c in candidates.values():
        gaps = {s: round(dense[s[:2]] - c["points"][s]["accuracy"], 4) for s in settings if s in c["points"]}
        missing = [list(s) for s in settings if s not in c["points"]]
        worst = max(gaps, key=gaps.get)
        costs = {p["predicted_prefill_s"] for p in c["points"].values()}
        table.append({
            "rule": c["rule"], "anchor": c["anchor"], "passing": c["passing"], "deployable": c["deployable"],
            "qualifies": not missing and gaps[worst] <= tolerance + 1e-9,
            "worst_gap": gaps[worst], "worst_at": list(worst), "missing": missing,
            "predicted_prefill_s": max(costs),
            "keys_per_row": round(sum(p["keys_per_row"] for p in c["points"].values()), 1),
        })
    order = lambda t: (t["predicted_prefill_s"], t["keys_per_row"], t["anchor"] != "paper" or t["passing"] != "paper",
                       t["rule"] != "mean", t["rule"], t["anchor"], t["passing"])
    table.sort(key=order)
    chosen = next((t for t in table if t["qualifies"] and t["deployable"]), None)
    best_any = next((t for t in table if t["qualifies"]), None)
    return {"tolerance": tolerance, "settings": [list(s) for s in settings], "chosen": chosen,
            "best_including_oracle_only": best_any, "candidates": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="choose APB-V's default budgets from a quality_budget sweep")
    ap.add_argument("results", help="benchmarks/results/quality_budget_smollm2.json (or a device run's copy)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help="accuracy points below dense allowed")
    args = ap.parse_args(argv)
    try:
        record = json.loads(Path(args.results).read_text())
        out = choose(record, tolerance=args.tolerance)
    except (OSError, ValueError, KeyError) as err:
        print(f"budget_choice: {args.results}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0 if out["chosen"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
