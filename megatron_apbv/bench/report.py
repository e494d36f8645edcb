"""What ``apbv bench`` writes: the JSON-lines file, the table (stderr) and the plot."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_apbv.methods import REFERENCE

LEVELS = ("layer", "model")



def write_jsonl(path: Path, rows: list[dict], meta: dict) -> None:
    """All rows so far, replacing the file atomically (temp file + ``os.replace``): never half a file."""
    from megatron_apbv.runtime.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({**meta, **row}) + "\n" for row in rows))


def _fmt(value, spec: str) -> str:
    return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    head = f"{'level':<6} {'length':>8} {'method':<9} {'median_ms':>11} {'peak_GiB':>9} {'vs_dense':>9} {'vs_ring':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        note = r["status"] if r["status"] != "ok" else ""
        if r.get("logit_diff_vs_dense") is not None and r["method"] != REFERENCE:
            note = f"logit diff {r['logit_diff_vs_dense']:.2e}"
        lines.append(
            f"{r['level']:<6} {r['length']:>8} {r['method']:<9} {_fmt(r['median_ms'], '11.3f')} "
            f"{_fmt(r['peak_mem_gib'], '9.3f')} {_fmt(r['speedup_vs_dense'], '9.2f')} "
            f"{_fmt(r['speedup_vs_ring'], '8.2f')}  {note}".rstrip()
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Median time against prompt length, log-log, one line per method and a panel per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    levels = [lv for lv in LEVELS if any(r["level"] == lv for r in rows)]
    fig, axes = plt.subplots(1, len(levels), figsize=(6 * len(levels), 4.5), squeeze=False)
    for ax, level in zip(axes[0], levels):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["length"], r["median_ms"]) for r in rows
                         if r["level"] == level and r["method"] == method and r["median_ms"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lengths = sorted({r["length"] for r in rows if r["level"] == level})
        ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured lengths on x
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{'one attention layer' if level == 'layer' else 'model prefill'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from megatron_apbv.runtime.atomic import atomic_open

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
