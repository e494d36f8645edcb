"""Non-finite numbers (NaN, Inf) fail the run on every rank, with a message saying where they appeared.

A NaN weight or an overflow would otherwise flow into the argmax (NaN logits give
token 0) and the run would exit 0 with a wrong answer. The checks are cheap: one
``torch.isfinite(x).all()`` per checked tensor, and one small collective per stage
so that every rank raises the same :class:`NonFiniteError` together (no rank is left
waiting in the next collective). Decoding keeps a device-side flag per step
(:class:`FiniteTracker`, no host sync) and checks it once at the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_apbv.runtime.host_collectives import collective_device


class NonFiniteError(RuntimeError):
    """NaN or Inf in a model output; the message names the stage (and step) and the ranks."""


def check_finite(value: torch.Tensor, where: str, group=None, *, step: torch.Tensor | int | None = None) -> None:
    """Raise :class:`NonFiniteError` on every rank of ``group`` if any rank's ``value`` holds NaN or Inf.

    ``value`` is a tensor to test, or an ``all-finite`` boolean flag already computed on the device.
    ``step`` (optional, ``-1`` = none) is this rank's first bad step, named in the message.
    One all-gather of two integers per rank, and one host sync.
    """
    ok = value if value.dtype == torch.bool and value.ndim == 0 else torch.isfinite(value).all()
    first = torch.as_tensor(-1 if step is None else step, device=ok.device).reshape(())
    mine = torch.stack([ok.to(torch.int64), first.to(torch.int64)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        mine = mine.to(collective_device(group))
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, mine, group=group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(everyone)))
    else:
        everyone, ranks = [mine], [dist.get_rank() if dist.is_available() and dist.is_initialized() else 0]
    rows = [t.cpu().tolist() for t in everyone]
    bad = [(rank, step) for rank, (finite, step) in zip(ranks, rows) if not finite]
    if bad:
        steps = sorted({s for _, s in bad if s >= 0})
        at = f" (first at step {steps[0]})" if steps else ""
        raise NonFiniteError(
            f"non-finite values (NaN or Inf) in {where}{at} on rank(s) {', '.join(str(r) for r, _ in bad)}: "
            "the weights or the inputs overflow (check model.checkpoint, model.init_std and dtype)"
        )


class FiniteTracker:
    """Device-side record of whether every tested tensor was finite, and the first step that was not.

    ``update`` launches two small device ops and never syncs with the host, so it can sit
    in a decode loop (or a CUDA graph); :meth:`check` syncs once, at the end.
    """

    def __init__(self, device: torch.device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, tensor: torch.Tensor, step: torch.Tensor | int) -> None:
        finite = torch.isfinite(tensor).all()
        step = torch.as_tensor(step, dtype=torch.int64, device=self.first_bad.device)
        self.first_bad = torch.where(self.ok & ~finite, step, self.first_bad)
        self.ok = self.ok & finite

    def check(self, where: str, group=None) -> None:
        """:func:`check_finite` of everything recorded (one collective)."""
        check_finite(self.ok, where, group, step=self.first_bad)


def non_finite_fields(record, prefix: str = "") -> list[str]:
    """Dotted names of the floats in a JSON-like record that are NaN or Inf."""
    if isinstance(record, dict):
        return [name for key, value in record.items() for name in non_finite_fields(value, f"{prefix}{key}.")]
    if isinstance(record, (list, tuple)):
        return [name for i, value in enumerate(record) for name in non_finite_fields(value, f"{prefix}{i}.")]
    if isinstance(record, float) and not torch.isfinite(torch.tensor(record)):
        return [prefix.rstrip(".")]
    return []
