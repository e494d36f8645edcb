"""Megatron's parallel groups as APB-V sees them."""

from __future__ import annotations

from megatron.core import parallel_state


def context_parallel_group():
    """The APB-V group: Megatron's context-parallel group."""
    return parallel_state.get_context_parallel_group()


def context_parallel_rank() -> int:
    """Position in the APB-V group: defines block ownership (not hostnames or global ranks)."""
    return parallel_state.get_context_parallel_rank()
