"""``apbv eval CONFIG``: accuracy of dense, exact, APB-V, APB-like and Star on the held-out needle set.

Launched on W ranks (W = ``parallel.context_parallel_size``), every rank loads the
trained needle model (``needle.checkpoint``) and runs each setting through the real
distributed code (Megatron GPT with :class:`~megatron_apbv.apbv.attention.APBVCoreAttention`
over the context-parallel group); rank 0 also runs the same weights densely on one
process. Settings: ``exact`` (p = all), ``apbv`` and ``apb_like`` at every budget of
``needle.budgets`` (fractions of the prompt, p = ceil(f * N)), and ``star`` (p = 0).

Reported per setting: accuracy (all, per question type), accuracy of the ``scene``
questions whose scene card lies outside the needle's own block and the anchor
(*cross-block*, where Star cannot see it) and inside (*local*), agreement of the
answer with dense, and the mean KL(dense || setting) of the answer distribution
(the next-token distribution over the whole vocabulary after the question).

``--demo`` answers one held-out question (``needle.demo_index``) with the configured
variant across the ranks and prints question, truth, APB-V's and dense's answers.

``python -m megatron_apbv.eval.evaluate plot OUT.png RESULT.json ...`` draws the plot
of several launches (e.g. W = 2 and W = 4).

(About 410 lines: the command, its settings, the forward passes, the scores and the plot of one
benchmark; the task itself is in needle.py and the model front end in frontend.py.)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_apbv.apbv.attention import APBVMask
from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.apbv.selection import SelectionRule
from megatron_apbv.eval.frontend import (
    build_frontend,
    load_checkpoint,
    prompt_embeddings,
)
from megatron_apbv.eval.needle import (
    QUESTION_TEXT,
    QUESTION_TYPES,
    NeedleGeometry,
    answer_name,
    collate,
    evidence_is_local,
    heldout_set,
    make_example,
)
from megatron_apbv.inference.divergence import kl_from_dense
from megatron_apbv.methods import METHODS, REFERENCE, get_method
from megatron_apbv.models.gpt import (
    build_gpt_model,
    build_rope,
    decoder_hidden,
    vocab_logits,
)
from megatron_apbv.runtime.config import ConfigError, RunConfig
from megatron_apbv.runtime.distributed import LaunchEnv
from megatron_apbv.runtime.groups import context_parallel_rank
from megatron_apbv.runtime.progress import Progress


def add_arguments(parser) -> None:
    parser.add_argument("--demo", action="store_true", help="answer one held-out question, print one JSON line")
    parser.add_argument("--out", default=None, help="rank 0 writes the result JSON here (and a PNG beside it)")
    parser.add_argument("--examples", type=int, default=None, help="held-out examples (default needle.eval_examples)")
    parser.add_argument("--settings", default=None,
                        help="comma-separated subset of: exact, apbv, apb_like, star (default: all)")
    parser.add_argument("--checkpoint", default=None, help="weights (default needle.checkpoint)")


# --------------------------------------------------------------------------- settings


def eval_settings(cfg: RunConfig, prompt_len: int, only: list[str] | None = None) -> list[dict]:
    """``[{name, variant, budget, passing_len, zigzag, overlap}]`` of one launch, every APB-V variant's.

    A variant that fixes its passing budget (exact, Star) is one setting; the others run every
    ``needle.budgets`` fraction. Zigzag, overlap and the fixed budgets are the registry's
    (``megatron_apbv.methods``). Order: passing every key, the budgets, the other fixed budgets.
    """
    family = [m for m in METHODS.values() if m.variant is not None]
    if only:
        unknown = set(only) - {m.variant for m in family}
        if unknown:
            raise ConfigError(f"--settings {sorted(unknown)}: choose from {', '.join(m.variant for m in family)}")

    def setting(m, name, budget, p):
        return dict(name=name, variant=m.variant, budget=budget, passing_len=p, zigzag=m.setting("zigzag"),
                    overlap=m.setting("overlap"))

    swept = []
    for frac in cfg.needle.budgets:
        p = math.ceil(frac * prompt_len)
        label = f"N/{round(1 / frac)}" if abs(1 / frac - round(1 / frac)) < 1e-9 else f"{frac:g}N"
        swept += [setting(m, f"{m.variant} p={label}", label, p) for m in family
                  if m.fixed_passing(prompt_len) is None]
    fixed = [setting(m, m.variant, "all" if p == prompt_len else str(p), p)
             for m in family if (p := m.fixed_passing(prompt_len)) is not None]
    out = [s for s in fixed if s["budget"] == "all"] + swept + [s for s in fixed if s["budget"] != "all"]
    return [s for s in out if s["variant"] in only] if only else out


# --------------------------------------------------------------------------- forward passes


class NeedleRunner:
    """The trained model on this rank (APB-V attention) and, on rank 0, its dense twin."""

    def __init__(self, cfg: RunConfig, device: torch.device, checkpoint: str | None = None):
        self.cfg, self.device = cfg, device
        self.geo = NeedleGeometry.from_config(cfg)
        if cfg.parallel.tensor_parallel_size != 1:
            raise ConfigError("apbv eval needs parallel.tensor_parallel_size=1")
        path = checkpoint or cfg.needle.checkpoint
        if not path:
            raise ConfigError("needle.checkpoint is not set: point it at the trained weights")
        self.rank, self.world = context_parallel_rank(), cfg.parallel.context_parallel_size
        self.model = build_gpt_model(cfg, method="apbv", device=device)
        self.frontend = build_frontend(self.geo, cfg.model.hidden_size, device).eval()
        try:
            self.metadata = load_checkpoint(path, self.model, self.frontend)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from None
        self.rope = build_rope(cfg, device)
        self.positions = torch.arange(self.geo.prompt_len)
        self.dense = None
        if self.rank == 0:
            self.dense = build_gpt_model(cfg, method=REFERENCE, device=device)
            self.dense.load_state_dict(self.model.state_dict())

    @torch.inference_mode()
    def embeddings(self, batch) -> torch.Tensor:
        return prompt_embeddings(self.model, self.frontend, self.geo, batch["input_ids"].to(self.device),
                                 batch["frames"].to(self.device))

    @torch.inference_mode()
    def dense_logits(self, embeds: torch.Tensor) -> torch.Tensor:
        hidden = decoder_hidden(self.dense, self.rope, None, self.positions.to(self.device), None,
                                inputs_embeds=embeds)
        return vocab_logits(self.dense, hidden[-1:])

    def layout(self, zigzag: bool) -> SequenceLayout:
        return SequenceLayout(self.geo.prompt_len, self.cfg.anchor_len, self.geo.query_tokens, self.world, zigzag)

    @torch.inference_mode()
    def apbv_logits(self, embeds: torch.Tensor, setting: dict) -> torch.Tensor:
        """Logits ``[b, vocab]`` of the last query token, the same on every rank."""
        layout = self.layout(setting["zigzag"]).rank(self.rank)
        idx = layout.global_indices
        mask = APBVMask(layout=layout, passing_lens=(setting["passing_len"],) * self.cfg.model.num_layers,
                        window=self.cfg.apbv.window, overlap=setting["overlap"],
                        selection=SelectionRule.from_config(self.cfg))
        hidden = decoder_hidden(self.model, self.rope, None, self.positions[idx].to(self.device), mask,
                                inputs_embeds=embeds[idx.to(embeds.device)])
        return vocab_logits(self.model, hidden[-1:])


# --------------------------------------------------------------------------- metrics


def _acc(pairs) -> float | None:
    pairs = list(pairs)
    return round(sum(p == t for p, t in pairs) / len(pairs), 4) if pairs else None


def score(examples, preds, dense_preds=None, kl=None, *, geo=None, layout: SequenceLayout | None = None) -> dict:
    rec = {"n": len(examples), "accuracy": _acc((p, e.answer) for p, e in zip(preds, examples))}
    for q in QUESTION_TYPES:
        rec[f"accuracy_{q}"] = _acc((p, e.answer) for p, e in zip(preds, examples) if e.question == q)
    if layout is not None:
        local = [evidence_is_local(geo, e, layout.block_spans, layout.anchor_len) for e in examples]
        scene = [i for i, e in enumerate(examples) if e.question == "scene"]
        cross = [i for i in scene if not local[i]]
        rec["scene_cross_n"] = len(cross)
        rec["accuracy_scene_cross"] = _acc((preds[i], examples[i].answer) for i in cross)
        rec["accuracy_scene_local"] = _acc((preds[i], examples[i].answer) for i in scene if local[i])
        if dense_preds is not None:
            rec["dense_accuracy_scene_cross"] = _acc((dense_preds[i], examples[i].answer) for i in cross)
    if dense_preds is not None:
        rec["agree_with_dense"] = _acc(zip(preds, dense_preds))
    if kl is not None:
        rec["mean_kl_vs_dense"] = float(kl.mean())
    return rec


# --------------------------------------------------------------------------- the command


def run_eval(cfg: RunConfig, env: LaunchEnv, device: torch.device, *, examples: int | None = None,
             only: list[str] | None = None, checkpoint: str | None = None) -> dict:
    """Every setting over the held-out set on every rank; the complete record on rank 0."""
    runner = NeedleRunner(cfg, device, checkpoint)
    geo = runner.geo
    exs = heldout_set(geo, cfg.needle.eval_examples if examples is None else examples)
    settings = eval_settings(cfg, geo.prompt_len, only)
    logits = {s["name"]: [] for s in settings}
    dense, seconds = [], {s["name"]: 0.0 for s in settings}
    dense_seconds = 0.0
    bs = cfg.needle.eval_batch
    batches = -(-len(exs) // bs)
    progress = Progress(batches * (1 + len(settings)), "apbv eval", enabled=runner.rank == 0)
    start = time.perf_counter()
    for i in range(0, len(exs), bs):
        batch = collate(exs[i : i + bs])
        where = f"examples {i + 1}-{min(i + bs, len(exs))} of {len(exs)}"
        progress.step(f"{where}: dense")
        embeds = runner.embeddings(batch)
        if runner.rank == 0:
            t0 = time.perf_counter()
            dense.append(runner.dense_logits(embeds).cpu())
            dense_seconds += time.perf_counter() - t0
        for s in settings:
            progress.step(f"{where}: {s['name']}")
            dist.barrier()
            t0 = time.perf_counter()
            out = runner.apbv_logits(embeds, s)
            seconds[s["name"]] += time.perf_counter() - t0
            logits[s["name"]].append(out.cpu())
    progress.close()
    total = time.perf_counter() - start
    record = {
        "benchmark": "needle",
        "world_size": runner.world,
        "prompt_tokens": geo.prompt_len,
        "anchor_len": cfg.anchor_len,
        "query_len": geo.query_tokens,
        "frames": geo.frames,
        "tokens_per_frame": geo.tokens_per_frame,
        "examples": len(exs),
        "heldout_seeds": [exs[0].seed, exs[-1].seed],
        "checkpoint": checkpoint or cfg.needle.checkpoint,
        "device": device.type,
        "dtype": cfg.dtype,
        "seconds": round(total, 1),
        "selection": cfg.apbv.selection,
    }
    if runner.rank != 0:
        return record
    dense = torch.cat(dense)
    dense_preds = dense.argmax(-1).tolist()
    record["dense"] = score(exs, dense_preds)
    record["dense"]["seconds"] = round(dense_seconds, 2)
    record["settings"] = []
    for s in settings:
        out = torch.cat(logits[s["name"]])
        preds = out.argmax(-1).tolist()
        rec = dict(s)
        rec.update(score(exs, preds, dense_preds, kl_from_dense(dense, out), geo=geo, layout=runner.layout(s["zigzag"])))
        rec["max_abs_logit_diff"] = float((out - dense).abs().max())
        rec["seconds"] = round(seconds[s["name"]], 2)
        record["settings"].append(rec)
    return record


def run_demo(cfg: RunConfig, env: LaunchEnv, device: torch.device, checkpoint: str | None = None) -> dict:
    """One held-out question answered with the configured variant across the ranks, and densely."""
    runner = NeedleRunner(cfg, device, checkpoint)
    geo = runner.geo
    index = cfg.needle.demo_index
    ex = make_example(geo, "heldout", index, QUESTION_TYPES[index % len(QUESTION_TYPES)])
    passing = cfg.passing_lens()
    setting = dict(passing_len=passing[0], zigzag=cfg.apbv.setting("zigzag"), overlap=cfg.apbv.setting("overlap"))
    batch = collate([ex])
    embeds = runner.embeddings(batch)
    layout = runner.layout(setting["zigzag"]).rank(runner.rank)
    mask = APBVMask(layout=layout, passing_lens=passing, window=cfg.apbv.window, overlap=setting["overlap"],
                    selection=SelectionRule.from_config(cfg))
    idx = layout.global_indices
    with torch.inference_mode():
        hidden = decoder_hidden(runner.model, runner.rope, None, runner.positions[idx].to(device), mask,
                                inputs_embeds=embeds[idx.to(embeds.device)])
        logits = vocab_logits(runner.model, hidden[-1:])
    record = {
        "question": QUESTION_TEXT[ex.question],
        "truth": answer_name(ex.answer),
        "apbv_answer": answer_name(int(logits[0].argmax())),
        "dense_answer": None,
        "variant": cfg.apbv.variant,
        "world_size": runner.world,
        "passing_len": passing[0],
        "prompt_tokens": geo.prompt_len,
        "heldout_index": index,
        "needle_frame": ex.needle_frame,
        "scene_card_frame": ex.scene_card,
        "scene_card_in_another_block": not evidence_is_local(
            geo, ex, runner.layout(setting["zigzag"]).block_spans, cfg.anchor_len),
    }
    if runner.rank == 0:
        dense = runner.dense_logits(embeds)
        record["dense_answer"] = answer_name(int(dense[0].argmax()))
        record["kl_vs_dense"] = float(kl_from_dense(dense, logits).mean())
    return record


def format_table(record: dict) -> str:
    head = f"needle benchmark: W={record['world_size']}, N={record['prompt_tokens']}, {record['examples']} held-out"
    cols = ["setting", "p", "acc", "colour", "scene", "scene-cross", "agree", "KL"]
    rows = [["dense", "-", record["dense"]["accuracy"], record["dense"]["accuracy_colour"],
             record["dense"]["accuracy_scene"], "", "", ""]]
    for s in record["settings"]:
        rows.append([s["name"], s["passing_len"], s["accuracy"], s["accuracy_colour"], s["accuracy_scene"],
                     f"{s['accuracy_scene_cross']} (n={s['scene_cross_n']}, dense {s['dense_accuracy_scene_cross']})",
                     s["agree_with_dense"], f"{s['mean_kl_vs_dense']:.2e}"])
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    lines = [head, "  ".join(str(c).ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def output_paths(out: str) -> tuple[Path, Path]:
    """(result JSON, plot) of ``--out``, checked on every rank before any work (a ConfigError names the fix)."""
    from megatron_apbv.runtime.outputs import check_distinct, check_output_path

    result = check_output_path(out, "--out")
    figure = check_output_path(result.with_suffix(".png"), "--out (its .png plot)")
    check_distinct({"result JSON": result, "plot": figure},
                   f"give --out a .json path (e.g. {str(result.with_suffix('.json'))!r}); the plot goes beside it")
    return result, figure


def write_outputs(record: dict, result: Path, figure: Path) -> None:
    """The JSON and the plot, each atomically; when the plot fails, the JSON written for it is removed too."""
    from megatron_apbv.runtime.atomic import atomic_write_text

    result.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result, json.dumps(record, indent=1, allow_nan=False) + "\n")
    try:
        plot([record], figure)
    except BaseException:
        result.unlink(missing_ok=True)  # a failed command leaves nothing it started writing
        raise


MAX_EXAMPLES = 1 << 20  # about a million examples: days on one GPU; a typo (1e9) should not look like a run


def check_arguments(args) -> None:
    """``--examples`` and ``--out`` as the config checks its fields (every rank, before any work)."""
    if args.examples is not None and not 1 <= args.examples <= MAX_EXAMPLES:
        raise ConfigError(
            f"--examples={args.examples} must be between 1 and {MAX_EXAMPLES} (leave it out for "
            "needle.eval_examples)"
        )
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out='' is empty: give the result JSON's path (the plot goes beside it), or leave it out")


def prepare(args, cfg: RunConfig):
    """The options' checks, on every rank before the process group starts (the CLI calls it)."""
    check_arguments(args)
    return output_paths(args.out) if args.out is not None else None


def command(args, cfg: RunConfig, env: LaunchEnv, device: torch.device) -> dict:
    """``apbv eval``."""
    check_arguments(args)
    outputs = output_paths(args.out) if args.out is not None else None  # every rank, before any model is built
    if args.demo:
        return run_demo(cfg, env, device, args.checkpoint)
    only = [s.strip() for s in args.settings.split(",")] if args.settings else None
    record = run_eval(cfg, env, device, examples=args.examples, only=only, checkpoint=args.checkpoint)
    if env.rank == 0:
        print(format_table(record), file=sys.stderr, flush=True)
        if outputs:
            write_outputs(record, *outputs)
    return record


# --------------------------------------------------------------------------- plot

# How each variant is drawn: legend name, colour, marker, x shift (swept series side by side at a budget).
_PLOT_STYLE = {"apbv": ("APB-V", "tab:blue", "o", 0.96), "apb_like": ("APB-like", "tab:green", "s", 1.04),
               "star": ("Star", "tab:red", "D", 1.0), "exact": ("exact", "tab:purple", "^", 1.0)}


def plot(records: list[dict], path) -> None:
    """Accuracy against the passing budget, one panel per world size: dense, exact and Star as lines.

    Series that coincide stay visible: APB-V and APB-like sit slightly left and right of their budget
    (hollow markers for the cross-block questions), and each reference line differs in colour, width and
    dash from the others. One legend for the figure, below the panels, outside the data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 4.6 if len(records) > 1 else 5.2), squeeze=False)
    for ax, rec in zip(axes[0], records):
        sets = rec["settings"]
        methods = {s["variant"]: get_method(s["variant"]) for s in sets}
        swept = [v for v, m in methods.items() if m.fixed_passing(rec["prompt_tokens"]) is None]
        # References first (underneath); the thick light line stays visible under a thin dashed one on top.
        ax.axhline(rec["dense"]["accuracy"], color="0.6", lw=4, alpha=0.6, label="dense (all)")
        zz = next((s for s in sets if methods[s["variant"]].setting("zigzag")
                   and s["dense_accuracy_scene_cross"] is not None), None)
        if zz is not None:
            ax.axhline(zz["dense_accuracy_scene_cross"], color="k", lw=1, ls="--", label="dense (scene, cross-block)")
        for s in sets:  # a fixed budget short of every key (Star) is a line across the budgets
            if s["variant"] not in swept and s["passing_len"] < rec["prompt_tokens"]:
                name, colour = _PLOT_STYLE[s["variant"]][:2]
                ax.axhline(s["accuracy"], color=colour, lw=1.5, ls=":", label=f"{name} (all)")
                if s["accuracy_scene_cross"] is not None:
                    ax.axhline(s["accuracy_scene_cross"], color=colour, lw=1, ls="-.",
                               label=f"{name} (scene, cross-block)")
        for variant in swept:
            name, colour, marker, shift = _PLOT_STYLE[variant]
            pts = [s for s in sets if s["variant"] == variant]
            xs = [s["passing_len"] * shift for s in pts]
            ax.plot(xs, [s["accuracy"] for s in pts], marker=marker, color=colour, ls="-", label=f"{name} (all)")
            ax.plot(xs, [s["accuracy_scene_cross"] or 0 for s in pts], marker=marker, color=colour, ls=":",
                    markerfacecolor="white", label=f"{name} (scene, cross-block)")
        ax.set_xscale("log", base=2)
        budgets = sorted({s["passing_len"] for s in sets if s["variant"] in swept})
        if budgets:
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
        ax.set_xlabel("passing budget p (keys per KV head per block)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1.04)
        ax.set_title(f"needle: W={rec['world_size']}, N={rec['prompt_tokens']}, {rec['examples']} examples")
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = 4 if len(records) > 1 else 2  # a single panel is too narrow for four
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.44 / columns, 1, 1))
    from megatron_apbv.runtime.atomic import atomic_open

    try:
        with atomic_open(path, "wb") as f:  # never half a PNG
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def _plot_main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m megatron_apbv.eval.evaluate plot OUT.png RESULT.json [RESULT.json ...]", file=sys.stderr)
        return 2
    records = [json.loads(Path(p).read_text()) for p in argv[1:]]
    plot(sorted(records, key=lambda r: r["world_size"]), argv[0])
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "plot":
        sys.exit(_plot_main(sys.argv[2:]))
    print(__doc__)
