"""Every passing-selection rule x budget x W on the held-out needle videos, in one process (issue 19).

The model's attention is the reference oracle's explicit APB-V mask (``eval/oracle.py``) under
each rule of ``apbv.selection``; ``tests/test_selection_rules.py`` proves the distributed layer
equals that oracle for every rule, so these are APB-V's answers without launching ranks. Per
setting: accuracy, cross-block ``scene`` accuracy (scene card outside the needle's block and the
anchor), agreement and mean KL(dense || setting) of the answer distribution, and
``card_passed_cross``: the share of cross-block ``scene`` questions where some token of the scene
card was visible to the needle's first token (in some layer and KV head), i.e. whether the rule
passed the keys the needle needed. Star (p = 0) is the floor. Writes JSON (+ a PNG beside it).

    python benchmarks/needle_selection_rules.py configs/needle.yaml --device cuda --examples 256 \\
        --out benchmarks/results/needle_rules_needle.json
    python benchmarks/needle_selection_rules.py configs/needle.yaml model.num_query_groups=4 \\
        needle.checkpoint=checkpoints/needle_kv4/needle.safetensors --name needle_kv4 --out ...
    python benchmarks/needle_selection_rules.py merge OUT.json PART.json ...   # e.g. one per W
    python benchmarks/needle_selection_rules.py plot RESULT.json OUT.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

RULES = ("mean", "softmax", "max", "recent", "frame")


T0 = time.perf_counter()  # --time-limit counts from the start of the process (imports included)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--name", default="needle", help="model label in the output")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budgets", default=None, help="comma-separated fractions of N (default needle.budgets)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds since the process started: start no new batch after this (the record says how many ran)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_apbv.apbv.layout import SequenceLayout
    from megatron_apbv.apbv.spec import get_gpt_layer_spec_with
    from megatron_apbv.eval.evaluate import _kl, score
    from megatron_apbv.eval.frontend import build_frontend, load_checkpoint, prompt_embeddings
    from megatron_apbv.eval.needle import NeedleGeometry, collate, evidence_is_local, heldout_set, needle_token_span
    from megatron_apbv.eval.oracle import MaskedOracleAttention
    from megatron_apbv.models.gpt import build_gpt_model, build_rope, decoder_hidden, vocab_logits
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29655")
    device = torch.device(args.device)
    cfg = load_config(args.config, [*args.overrides, "parallel.context_parallel_size=1", f"device={device.type}"])
    init_distributed(cfg, LaunchEnv(0, 1, 0), device)  # Megatron's model needs its groups; one process
    try:
        geo = NeedleGeometry.from_config(cfg)
        n, a, q = geo.prompt_len, cfg.anchor_len, geo.query_tokens
        settings: dict = {}
        record: dict = {"watch": None, "hits": None}

        class RecordingOracle(MaskedOracleAttention):
            """The oracle's attention; also notes whether the needle's first token sees the scene card."""

            def __init__(self, *a_, record=None, **kw):
                super().__init__(*a_, **kw)
                self.record = record

            def example_mask(self, index, query, key):
                m = super().example_mask(index, query, key)
                watch = self.record["watch"]
                if m is not None and watch is not None and watch[index] is not None:
                    row, lo, hi = watch[index]
                    self.record["hits"][index] |= bool(m[:, row, lo:hi].any())
                return m

        spec = get_gpt_layer_spec_with(ModuleSpec(module=RecordingOracle,
                                                  params={"settings": settings, "record": record}))
        model = build_gpt_model(cfg, method="dense", device=device, layer_spec=spec).eval()
        frontend = build_frontend(geo, cfg.model.hidden_size, device).eval()
        load_checkpoint(cfg.needle.checkpoint, model, frontend)
        rope = build_rope(cfg, device)
        exs = heldout_set(geo, args.examples)
        worlds = [int(w) for w in args.worlds.split(",")]
        rules = args.rules.split(",")
        fracs = [float(f) for f in args.budgets.split(",")] if args.budgets else cfg.needle.budgets
        budgets = [(f"N/{round(1 / f)}", math.ceil(f * n)) for f in fracs]
        runs = [dict(world=w, rule="star", budget="0", passing_len=0) for w in worlds]
        runs += [dict(world=w, rule=r, budget=label, passing_len=p) for w in worlds for r in rules
                 for label, p in budgets]
        layouts = {w: SequenceLayout(n, a, q, w, zigzag=True) for w in worlds}
        cross = {w: [e.question == "scene" and not evidence_is_local(geo, e, layouts[w].block_spans, a) for e in exs]
                 for w in worlds}
        dense, logits, hits = [], {i: [] for i in range(len(runs))}, {i: [] for i in range(len(runs))}
        start = time.perf_counter()
        print(f"ready {start - T0:.0f} s after start: {len(runs)} settings x {len(exs)} examples", file=sys.stderr,
              flush=True)

        def summary(done: int) -> dict:
            """The record of the first ``done`` examples; written after every batch (a killed run keeps them)."""
            ex_done = exs[:done]
            dense_all = torch.cat(dense)
            dense_preds = dense_all.argmax(-1).tolist()
            out = dict(benchmark="needle_selection_rules", model=args.name, checkpoint=cfg.needle.checkpoint,
                       kv_heads=cfg.model.num_query_groups, prompt_tokens=n, anchor_len=a, query_len=q,
                       tokens_per_frame=geo.tokens_per_frame, examples=done, examples_planned=len(exs),
                       device=str(device), torch=torch.__version__, recent_fraction=cfg.apbv.recent_fraction,
                       attention="reference-oracle explicit mask (single process)",
                       seconds=round(time.perf_counter() - start, 1), dense=score(ex_done, dense_preds), settings=[])
            for i, run in enumerate(runs):
                res = torch.cat(logits[i])
                rec = dict(run)
                rec.update(score(ex_done, res.argmax(-1).tolist(), dense_preds, _kl(dense_all, res), geo=geo,
                                 layout=layouts[run["world"]]))
                idx = [j for j, c in enumerate(cross[run["world"]][:done]) if c]
                rec["card_passed_cross"] = round(sum(hits[i][j] for j in idx) / len(idx), 4) if idx else None
                # Keys passed per layer: p per KV head per block, 2W blocks (the last block's never used).
                rec["passed_keys_per_layer"] = run["passing_len"] * cfg.model.num_query_groups * 2 * run["world"]
                out["settings"].append(rec)
            return out

        def write(out: dict) -> None:
            if args.out:
                path = Path(args.out)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(out, indent=1) + "\n")
                tmp.replace(path)

        done = 0
        for lo in range(0, len(exs), args.batch):
            if args.time_limit is not None and time.perf_counter() - T0 > args.time_limit:
                print(f"time limit: stopping after {lo} examples", file=sys.stderr, flush=True)
                break
            chunk = exs[lo : lo + args.batch]
            batch = collate(chunk)
            with torch.no_grad():
                embeds = prompt_embeddings(model, frontend, geo, batch["input_ids"].to(device),
                                           batch["frames"].to(device))

                def answer():
                    hidden = decoder_hidden(model, rope, None, torch.arange(n, device=device), None,
                                            inputs_embeds=embeds)
                    return vocab_logits(model, hidden[-1:]).float().cpu()

                settings.clear()
                record["watch"] = None
                dense.append(answer())
                for i, run in enumerate(runs):
                    settings.clear()
                    settings.update(mode="apbv", world_size=run["world"], anchor_len=a, query_len=q,
                                    passing_len=run["passing_len"], zigzag=True, window=cfg.apbv.window,
                                    selection="mean" if run["rule"] == "star" else run["rule"],
                                    frame_start=geo.video_start, frame_len=geo.tokens_per_frame,
                                    recent_fraction=cfg.apbv.recent_fraction)
                    flags = cross[run["world"]][lo : lo + len(chunk)]
                    record["watch"] = [(needle_token_span(geo, e)[0], *geo.frame_span(e.scene_card)) if f else None
                                       for e, f in zip(chunk, flags)]
                    record["hits"] = [False] * len(chunk)
                    logits[i].append(answer())
                    hits[i] += record["hits"]
            done = lo + len(chunk)
            write(summary(done))
            print(f"{done}/{len(exs)} examples, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if done == 0:
            print("no example finished before the time limit", file=sys.stderr, flush=True)
            return 1
        out = summary(done)
        for rec in out["settings"]:
            print(json.dumps({k: rec[k] for k in ("world", "rule", "budget", "accuracy", "accuracy_scene_cross",
                                                  "scene_cross_n", "mean_kl_vs_dense", "card_passed_cross")}),
                  flush=True)
        write(out)
        if args.out and not args.no_plot:
            plot(out, Path(args.out).with_suffix(".png"))
    finally:
        shutdown(wait_for_peers=False)
    return 0


def plot(rec: dict, path) -> None:
    """Cross-block scene accuracy against the budget, one line per rule, one panel per W."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({s["world"] for s in rec["settings"]})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4), squeeze=False)
    for ax, w in zip(axes[0], worlds):
        sets = [s for s in rec["settings"] if s["world"] == w]
        for colour, rule in enumerate(RULES):  # one colour per rule in every panel
            pts = [s for s in sets if s["rule"] == rule]
            if pts:
                ax.plot([s["passing_len"] for s in pts], [s["accuracy_scene_cross"] for s in pts], "o-",
                        color=f"C{colour}", label=rule)
        star = next(s for s in sets if s["rule"] == "star")
        ax.axhline(star["accuracy_scene_cross"], color="r", ls=":", label="star")
        if star.get("dense_accuracy_scene_cross") is not None:  # records rebuilt from stdout lines lack it
            ax.axhline(star["dense_accuracy_scene_cross"], color="k", lw=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("passing budget p (keys per KV head per block)")
        ax.set_ylabel("cross-block scene accuracy")
        ax.set_title(f"{rec['model']}: W={w}, {star.get('examples', rec['examples'])} videos "
                     f"(cross-block n={star['scene_cross_n']})")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(out_path: str, parts: list[str]) -> int:
    """One record of a model from records of the same model and examples (e.g. one per W)."""
    recs = [json.loads(Path(p).read_text()) for p in parts]
    out = dict(recs[0])
    if any(r["model"] != out["model"] for r in recs):
        raise SystemExit("merge: the records are of different models")
    out["examples"] = sorted({r["examples"] for r in recs})  # one value unless a time limit cut a part short
    # Every setting keeps the example count and the run it came from.
    out["settings"] = [dict(s, examples=r["examples"], run=r.get("run", "")) for r in recs for s in r["settings"]]
    out.pop("examples_planned", None)
    out["seconds"] = [r.get("seconds") for r in recs]
    Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("merge", "plot"):
        if sys.argv[1] == "merge":
            raise SystemExit(merge(sys.argv[2], sys.argv[3:]))
        plot(json.loads(Path(sys.argv[2]).read_text()), sys.argv[3])
        raise SystemExit(0)
    raise SystemExit(main())
