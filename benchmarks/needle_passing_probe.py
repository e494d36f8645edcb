"""Why APB-V misses ``scene`` questions: does the needle see the right scene card through the passing blocks?

For every held-out ``scene`` question whose scene card lies in another block than the
needle (cross-block), runs the trained needle model once in one process under the
reference oracle's APB-V mask (the same selection as the distributed code) and records,
per layer and KV head, how many of the scene card's 24 tokens the needle's first token
may attend to (summed: ``scene_card_tokens_seen``), the same for every other card, and
whether an earlier card outside the anchor reached the needle through more tokens than
the scene card (``other_card_outseen``). Writes JSON and prints one line per
question.

    python benchmarks/needle_passing_probe.py configs/needle.yaml --world 2 --out probe_w2.json

With p = N/128 (about one frame per block and KV head) the selection is query-aware only:
which frame of an earlier block reaches the needle depends on how the question scores it,
not on whether it is the latest card before the needle. Results of the committed model:
``benchmarks/results/needle_probe_w2.json``, ``needle_probe_w4.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--world", type=int, default=2, help="APB-V group size W")
    ap.add_argument("--examples", type=int, default=64,
                    help="held-out examples (their scene, cross-block questions are probed)")
    ap.add_argument("--budget", type=float, default=1 / 128, help="p / N")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_apbv.apbv.layout import Span
    from megatron_apbv.apbv.reference import (
        apbv_block_bounds_reference,
        apbv_mask_reference,
    )
    from megatron_apbv.apbv.spec import get_gpt_layer_spec_with
    from megatron_apbv.eval.frontend import (
        build_frontend,
        load_checkpoint,
        prompt_embeddings,
    )
    from megatron_apbv.eval.needle import (
        NeedleGeometry,
        collate,
        evidence_is_local,
        heldout_set,
        needle_token_span,
    )
    from megatron_apbv.eval.oracle import MaskedOracleAttention
    from megatron_apbv.models.gpt import (
        build_gpt_model,
        build_rope,
        decoder_hidden,
        vocab_logits,
    )
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29653")
    cfg = load_config(args.config, ["parallel.context_parallel_size=1", "device=cpu"])
    device = torch.device("cpu")
    init_distributed(cfg, LaunchEnv(0, 1, 0), device)  # Megatron's model needs its groups; one process
    try:
        geo = NeedleGeometry.from_config(cfg)
        n, a, q = geo.prompt_len, cfg.anchor_len, geo.query_tokens
        passing = math.ceil(args.budget * n)
        settings = dict(mode="apbv", world_size=args.world, anchor_len=a, query_len=q, passing_len=passing,
                        zigzag=True, window=cfg.apbv.window)
        masks: list[torch.Tensor] = []

        class RecordingAttention(MaskedOracleAttention):
            """The oracle's attention that also keeps each layer's APB-V mask."""

            def forward(self, query, key, value, *rest, **kwargs):
                opts = {k: v for k, v in self.settings.items() if k != "mode"}
                masks.append(apbv_mask_reference(query[:, 0].float(), key[:, 0].float(), **opts))
                return super().forward(query, key, value, *rest, **kwargs)

        spec = get_gpt_layer_spec_with(ModuleSpec(module=RecordingAttention, params={"settings": settings}))
        model = build_gpt_model(cfg, method="dense", device=device, layer_spec=spec)
        frontend = build_frontend(geo, cfg.model.hidden_size, device).eval()
        load_checkpoint(cfg.needle.checkpoint, model, frontend)
        rope = build_rope(cfg, device)
        spans = [Span(s, e) for s, e in apbv_block_bounds_reference(n, world_size=args.world, anchor_len=a,
                                                                        query_len=q, zigzag=True)]

        def block_of(token: int):
            return "anchor" if token < a else next(i for i, s in enumerate(spans) if s.start <= token < s.stop)

        rows = []
        for ex in heldout_set(geo, args.examples):
            if ex.question != "scene" or evidence_is_local(geo, ex, spans, a):
                continue
            masks.clear()
            batch = collate([ex])
            with torch.no_grad():
                embeds = prompt_embeddings(model, frontend, geo, batch["input_ids"], batch["frames"])
                hidden = decoder_hidden(model, rope, None, torch.arange(n), None, inputs_embeds=embeds)
                pred = int(vocab_logits(model, hidden[-1:]).argmax(-1))
            needle = needle_token_span(geo, ex)[0]

            def seen(frame: int) -> list[list[int]]:  # [layer][kv head]: tokens of the frame the needle sees
                lo, hi = geo.frame_span(frame)
                return [[int(m[h, needle, lo:hi].sum()) for h in range(m.shape[0])] for m in masks]

            row = dict(seed=ex.seed, correct=pred == ex.answer, needle_frame=ex.needle_frame,
                       needle_block=block_of(needle), scene_card=ex.scene_card,
                       card_blocks={f: block_of(geo.frame_span(f)[0]) for f in ex.card_frames},
                       scene_card_seen=seen(ex.scene_card),
                       other_cards_seen={f: seen(f) for f in ex.card_frames if f != ex.scene_card})
            # The failure mode: an earlier card outside the anchor (the anchor is always whole) reached the
            # needle through more passed tokens than the scene card did.
            total = lambda counts: sum(map(sum, counts))  # noqa: E731
            row["scene_card_tokens_seen"] = total(row["scene_card_seen"])
            row["other_card_outseen"] = any(
                total(counts) > row["scene_card_tokens_seen"] for f, counts in row["other_cards_seen"].items()
                if f < ex.needle_frame and row["card_blocks"][f] != "anchor")
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("seed", "correct", "needle_frame", "scene_card", "card_blocks",
                                                  "scene_card_tokens_seen", "other_card_outseen")}), flush=True)
        right = [r for r in rows if r["correct"]]
        wrong = [r for r in rows if not r["correct"]]
        summary = dict(world_size=args.world, passing_len=passing, prompt_tokens=n, anchor_len=a,
                       cross_block_scene_questions=len(rows), correct=len(right),
                       scene_card_tokens_seen_when_correct=[r["scene_card_tokens_seen"] for r in right],
                       scene_card_tokens_seen_when_wrong=[r["scene_card_tokens_seen"] for r in wrong],
                       other_card_outseen_when_correct=sum(r["other_card_outseen"] for r in right),
                       other_card_outseen_when_wrong=sum(r["other_card_outseen"] for r in wrong))
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(summary=summary, questions=rows), f, indent=1)
    finally:
        shutdown(wait_for_peers=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
