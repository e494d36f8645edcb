"""Every rank must run the same configuration, lengths and code.

Each rank validates its own config before any collective, but a rank can still
be launched with other overrides, another YAML or another checkout than its
peers (a per-node script, a stale copy on one host). Those ranks would then
compute different layouts and exchange buffers of different sizes: a hang or
silent garbage. :func:`check_ranks_agree` runs right after the process group
starts: each rank hashes a canonical JSON of its resolved config plus the
quantities it derived from it, the hashes are all-gathered, and on a mismatch
*every* rank raises the same :class:`~megatron_apbv.runtime.config.ConfigError`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_apbv.runtime.config import ConfigError, RunConfig
from megatron_apbv.runtime.host_collectives import collective_device

# The digest travels as this many int64 words (the whole sha256).
_WORDS = 4


def package_versions() -> dict[str, str]:
    """Versions of the code every rank must share."""
    import megatron_apbv

    versions = {"megatron_apbv": megatron_apbv.__version__}
    try:
        from megatron.core import package_info

        versions["megatron_core"] = package_info.__version__
    except Exception:  # pragma: no cover - a broken install fails elsewhere, loudly
        versions["megatron_core"] = "unknown"
    return versions


def agreement_extra(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """What each rank derived from its config: lengths, budgets, world size, code versions."""
    return {
        "world_size": world_size,
        "prompt_len": cfg.prompt_len,
        "anchor_len": cfg.anchor_len,
        "query_len": cfg.query_len,
        "passing_lens": list(cfg.passing_lens()),
        "zigzag": cfg.apbv.setting("zigzag"),
        "overlap": cfg.apbv.setting("overlap"),
        **package_versions(),
    }


def canonical_json(cfg: RunConfig, extra: Optional[dict] = None) -> str:
    """Sorted, whitespace-free JSON of the resolved config and ``extra``: equal iff the inputs are."""
    payload = {"config": cfg.model_dump(mode="json"), "extra": extra or {}}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(cfg: RunConfig, extra: Optional[dict] = None) -> bytes:
    """sha256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(cfg, extra).encode()).digest()


def _as_words(digest: bytes) -> list[int]:
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little", signed=True) for i in range(_WORDS)]


def check_ranks_agree(cfg: RunConfig, extra: Optional[dict] = None, group=None) -> str:
    """All-gather every rank's fingerprint; raise :class:`ConfigError` on every rank unless all agree.

    Returns the shared fingerprint (hex). A group of one (or no process group)
    agrees with itself and skips the collective.
    """
    digest = fingerprint(cfg, extra)
    if not dist.is_available() or not dist.is_initialized():
        return digest.hex()
    world = dist.get_world_size(group)
    if world == 1:
        return digest.hex()
    device = collective_device(group)
    mine = torch.tensor(_as_words(digest), dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    words = [t.cpu().tolist() for t in everyone]
    differ = [r for r in range(1, world) if words[r] != words[0]]
    if differ:
        # Every rank saw the same hashes, so every rank takes this branch: one more collective
        # (the readable settings) is safe and lets the message name what differs.
        payloads: list = [None] * world
        dist.all_gather_object(payloads, _flatten(json.loads(canonical_json(cfg, extra))), group=group)
        details = "; ".join(_describe(r, payloads[r], payloads[0]) for r in differ)
        global_ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        where = "" if group is None else f" (global ranks {', '.join(str(global_ranks[r]) for r in differ)})"
        raise ConfigError(
            f"ranks disagree: rank(s) {', '.join(str(r) for r in differ)}{where} of {world} differ from rank 0 "
            f"({details}): the config file, the key=value overrides and the installed code must be "
            f"identical on all ranks"
        )
    return digest.hex()


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _describe(rank: int, theirs: dict, ours: dict, limit: int = 4) -> str:
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k, "<unset>") != ours.get(k, "<unset>"))
    shown = [f"{k.removeprefix('config.').removeprefix('extra.')}={theirs.get(k, '<unset>')!r} "
             f"(rank 0: {ours.get(k, '<unset>')!r})" for k in keys[:limit]]
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"rank {rank}: " + (", ".join(shown) + more if shown else "same settings, different hash")
