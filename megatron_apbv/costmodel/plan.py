"""``apbv plan CONFIG --gpus N``: predicted prefill time per method, and the APB-V budgets to use.

The model shape, dtype, batch and query length come from CONFIG (``key=value``
overrides apply, e.g. ``model.num_layers=28``); the prompt length from
``--tokens`` (default: the config's prompt). Times come from
:mod:`megatron_apbv.costmodel.predict`, calibrated at every call on the measured points of
``--calibration-dir`` (default: the committed results packaged with apbv, so it runs from any folder).

The budget search is over a grid of anchors ``a in {N/256 .. N/32}`` and passing
budgets ``p in {N/512 .. N/32}`` (rounded up to 128 like the paper's ``auto``),
keeping ``a >= N/64`` and ``p >= N/128`` (the paper's defaults) unless
``--min-anchor`` / ``--min-passing`` say otherwise. Those floors are the only
accuracy proxy: this is a TIME model, and a smaller budget is never predicted
to be less accurate by it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.costmodel.calibration import calibrated_profiles
from megatron_apbv.costmodel.predict import predict
from megatron_apbv.costmodel.shapes import ModelShape
from megatron_apbv.methods import COMPARED, REFERENCE
from megatron_apbv.runtime.config import ConfigError, RunConfig, roundup

ANCHOR_FRACTIONS = (256, 128, 64, 32)  # a = N / f
PASSING_FRACTIONS = (512, 256, 128, 64, 32)  # p = N / f
# The ring model holds a (2 x gpus)^2 matrix of block pairs per prediction (pairs.py): time and memory grow
# with the square of the group. 1024 GPUs (far beyond any sequence-parallel group) plans in about a minute
# and 0.3 GB on one CPU core; 65536 would need 128 GiB.
MAX_GPUS = 1024
MAX_TOKENS = 1 << 40
NOTE = ("time model, not an accuracy model: budgets are chosen for predicted speed subject only to the floors "
        "min_anchor / min_passing (the paper's defaults a >= N/64, p >= N/128 unless overridden)")


def add_arguments(parser) -> None:
    parser.add_argument("--gpus", type=int, required=True, help=f"GPUs in the sequence-parallel group (1 to {MAX_GPUS})")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--interconnect", default=None,
                        help="link profile of megatron_apbv/costmodel/profiles.yaml: nvlink (one NVLink domain), ib (NVLink in a "
                             "node + InfiniBand 8x400G), ib4, ethernet; default nvlink within a node, ib beyond")
    parser.add_argument("--gpu", default="h100", help="GPU profile (h100, h200)")
    parser.add_argument("--tokens", type=int, default=None, help="prompt length N (default: the config's prompt)")
    parser.add_argument("--min-anchor", default="1/64", help="anchor floor: tokens, or a fraction of N like 1/64")
    parser.add_argument("--min-passing", default="1/128", help="passing floor: tokens, or a fraction of N")
    parser.add_argument("--profiles", default=None, help="profiles YAML (default megatron_apbv/costmodel/profiles.yaml)")
    parser.add_argument("--calibration-dir", default=None,
                        help="folder of measured results to calibrate the profiles on, e.g. benchmarks/results of "
                             "the repository (default: the copy of the committed results packaged with apbv)")


def _floor(text: str, n: int, name: str) -> float:
    """``"1/64"`` or ``"0.015"`` -> fraction of ``n``; ``"2048"`` -> tokens."""
    usage = f"--{name}={text!r}: give tokens (2048), a fraction (0.015) or a ratio (1/64)"
    try:
        parts = [float(part) for part in text.split("/")] if "/" in text else [float(text)]
    except ValueError:
        raise ConfigError(usage) from None
    if len(parts) == 2:
        num, den = parts
        if not (math.isfinite(num) and math.isfinite(den)) or den <= 0 or num < 0:
            raise ConfigError(f"{usage}; a ratio needs a finite numerator >= 0 and a denominator > 0")
        return n * num / den
    if len(parts) != 1:
        raise ConfigError(usage)
    value = parts[0]
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"--{name}={text!r} must be a finite number >= 0")
    return n * value if value < 1 else value


def _check_profiles(path: str | None) -> None:
    """``--profiles`` must be a YAML mapping with ``gpus`` and ``interconnects`` (a ConfigError otherwise)."""
    if path is None:
        return
    import yaml

    from megatron_apbv.runtime.loading import MAX_CONFIG_BYTES, parse_yaml

    given = Path(path)
    if not given.is_file():
        raise ConfigError(f"--profiles={path!r} {'is not a regular file' if given.exists() else 'does not exist'}")
    if given.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"--profiles={path!r}: larger than {MAX_CONFIG_BYTES} bytes: not a profiles YAML")
    try:
        data = parse_yaml(given.read_text(encoding="utf-8-sig"))
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"--profiles={path!r}: not a readable YAML file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("gpus", "interconnects")):
        raise ConfigError(
            f"--profiles={path!r} is not a profiles YAML: it needs the mappings gpus: and interconnects: "
            "(see megatron_apbv/costmodel/profiles.yaml)"
        )


def plan(cfg: RunConfig, *, gpus: int, gpus_per_node: int = 8, interconnect: str | None = None, gpu: str = "h100",
         tokens: int | None = None, min_anchor: str = "1/64", min_passing: str = "1/128",
         profiles: str | None = None, calibration_dir: str | None = None) -> dict:
    """The record ``apbv plan`` prints (see the module docstring)."""
    check_arguments(gpus=gpus, gpus_per_node=gpus_per_node, tokens=tokens)
    _check_profiles(profiles)
    try:
        calibration = calibrated_profiles(profiles, calibration_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"--calibration-dir: {err}: give a folder of results such as the repository's "
                          "benchmarks/results, or leave it out to use the packaged ones") from None
    prof = calibration.profiles
    interconnect = interconnect or ("nvlink" if gpus <= gpus_per_node else "ib")
    try:
        cluster = prof.cluster(gpu, interconnect, gpus, gpus_per_node)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    shape = ModelShape.from_config(cfg)
    n = tokens if tokens is not None else cfg.prompt_len
    q = cfg.query_len
    if n < q + 1:
        raise ConfigError(f"--tokens={n} leaves no room for the {q} query tokens (input.query_tokens)")
    floor_a, floor_p = _floor(min_anchor, n, "min-anchor"), _floor(min_passing, n, "min-passing")
    anchors = sorted({min(roundup(n / f, 128), n - q) for f in ANCHOR_FRACTIONS})
    # A budget at or above the longest block passes every key: candidates beyond it are the same plan.
    longest = max(len(s) for s in SequenceLayout(n, anchors[0], q, gpus).block_spans)
    passings = sorted({min(roundup(n / f, 128), longest) for f in PASSING_FRACTIONS})

    grid = []
    for a in anchors:
        for p in passings:
            t = predict("apbv", shape, cluster, n, anchor_len=a, query_len=q, passing=p).seconds
            grid.append({"anchor": a, "passing": p, "apbv_seconds": round(t, 6),
                         "allowed": a >= min(floor_a, anchors[-1]) and p >= min(floor_p, passings[-1])})
    best = min((g for g in grid if g["allowed"]), key=lambda g: (g["apbv_seconds"], -g["anchor"], -g["passing"]))
    a, p = best["anchor"], best["passing"]

    preds = {m: predict(m, shape, cluster, n, anchor_len=a, query_len=q, passing=p) for m in COMPARED}
    feasible = {m: r.seconds for m, r in preds.items() if r.feasible}
    fastest = min(feasible, key=feasible.get)
    dense = preds[REFERENCE].seconds
    record = {
        "command": "plan",
        "gpus": gpus,
        "gpus_per_node": gpus_per_node,
        "interconnect": interconnect,
        "gpu": gpu,
        "prompt_tokens": n,
        "query_tokens": q,
        "model": {"layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads, "kv_heads": shape.kv_heads,
                  "head_dim": shape.head_dim, "ffn": shape.ffn, "vocab": shape.vocab, "dtype_bytes": shape.dtype_bytes,
                  "batch": shape.batch, "params_b": round(shape.params / 1e9, 3)},
        "best_budget": {"anchor": a, "passing": p, "passes_every_key": p >= longest,
                        "apbv_seconds": best["apbv_seconds"],
                        "min_anchor": round(floor_a, 1), "min_passing": round(floor_p, 1)},
        "fastest": fastest,
        "speedup_vs_dense": {m: round(dense / t, 3) for m, t in feasible.items()},
        "methods": {m: r.as_dict() for m, r in preds.items()},
        "grid": grid,
        "calibration_max_abs_error_pct": round(calibration.max_abs_error_pct, 2),
        "note": NOTE,
    }
    return record


def format_table(record: dict) -> str:
    m = record["model"]
    lines = [
        f"apbv plan: {m['layers']} layers, hidden {m['hidden']}, {m['heads']}/{m['kv_heads']} heads x {m['head_dim']}, "
        f"{m['params_b']} B params; N = {record['prompt_tokens']} tokens (query {record['query_tokens']}); "
        f"{record['gpus']} x {record['gpu']}, {record['gpus_per_node']} per node, {record['interconnect']}",
        f"{'method':<9} {'prefill s':>10} {'vs dense':>9} {'layer ms':>9} {'attn ms':>9} {'comm ms':>9} "
        f"{'exposed':>9} {'linear ms':>10} {'tok/rank':>9} {'mem GB':>8}",
    ]
    for name, r in record["methods"].items():
        if not r["feasible"]:
            lines.append(f"{name:<9} {'-':>10}  {r['reason']}")
            continue
        fits = "" if r["fits_memory"] else " (over memory)"
        lines.append(
            f"{name:<9} {r['seconds']:>10.4g} {record['speedup_vs_dense'][name]:>8.2f}x {r['layer_ms']:>9.2f} "
            f"{r['attention_ms']:>9.2f} {r['comm_ms']:>9.2f} {r['exposed_comm_ms']:>9.2f} "
            f"{r['linear_ms'] + r['elementwise_ms']:>10.2f} {r['local_tokens']:>9} {r['memory_gb']:>8.1f}{fits}"
        )
    b = record["best_budget"]
    lines.append(f"fastest: {record['fastest']}.  APB-V budgets: anchor a = {b['anchor']}, passing p = {b['passing']} "
                 f"(floors a >= {b['min_anchor']:g}, p >= {b['min_passing']:g}) -> {b['apbv_seconds']:.4g} s; "
                 "APB-like and Star use the same budgets."
                 + (" p reaches the block length: every key is passed (APB-V is exact here)."
                    if b["passes_every_key"] else ""))
    lines.append(f"calibration: largest error on the fitted points {record['calibration_max_abs_error_pct']}%; "
                 "no multi-GPU point beyond 2 GPUs was measured.")
    lines.append("NOTE: " + record["note"] + ".")
    return "\n".join(lines)


def check_arguments(*, gpus: int, gpus_per_node: int, tokens: int | None) -> None:
    """The numeric options' ranges, checked before any work (a ConfigError names the option)."""
    for name, value in (("--gpus", gpus), ("--gpus-per-node", gpus_per_node)):
        if not 1 <= value <= MAX_GPUS:
            raise ConfigError(f"{name}={value} must be between 1 and {MAX_GPUS}")
    if tokens is not None and not 1 <= tokens <= MAX_TOKENS:
        raise ConfigError(f"--tokens={tokens} must be between 1 and {MAX_TOKENS}")


def command(args, cfg: RunConfig) -> dict:
    """``apbv plan``: one JSON line on stdout (by the CLI), a readable table on stderr."""
    record = plan(cfg, gpus=args.gpus, gpus_per_node=args.gpus_per_node, interconnect=args.interconnect,
                  gpu=args.gpu, tokens=args.tokens, min_anchor=args.min_anchor, min_passing=args.min_passing,
                  profiles=args.profiles, calibration_dir=args.calibration_dir)
    print(format_table(record), file=sys.stderr)
    return record
