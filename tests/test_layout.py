"""Layout properties: every token owned once, positions global, blocks by the tensor_split rule."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_apbv.apbv.layout import SequenceLayout


@st.composite
def layouts(draw):
    world = draw(st.integers(1, 9))
    anchor = draw(st.integers(0, 40))
    query = draw(st.integers(0, 20))
    context = draw(st.integers(0, 120))
    return SequenceLayout(anchor + context + query, anchor, query, world, zigzag=draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_every_token_owned_exactly_once(seq):
    ranks = seq.ranks()
    anchor, query = seq.anchor.indices(), seq.query.indices()
    context_owned = []
    for r in ranks:
        g = r.global_indices
        assert len(g) == r.local_len
        # anchor first and query last on every rank (replicated)
        assert torch.equal(g[: seq.anchor_len], anchor)
        assert torch.equal(g[len(g) - seq.query_len :], query)
        context_owned.append(g[seq.anchor_len : len(g) - seq.query_len])
    owned = torch.cat(context_owned).sort().values
    assert torch.equal(owned, torch.arange(seq.anchor_len, seq.prompt_len - seq.query_len))


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_blocks_follow_tensor_split_and_positions_increase(seq):
    context = torch.arange(seq.anchor_len, seq.prompt_len - seq.query_len)
    expected = torch.tensor_split(context, seq.num_blocks)
    assert [s.indices().tolist() for s in seq.block_spans] == [e.tolist() for e in expected]
    for r in seq.ranks():
        pos = r.global_indices  # the 1-D RoPE positions of the local tokens
        for sl in r.local_block_slices():
            block = pos[sl]
            assert torch.all(block[1:] - block[:-1] == 1)  # global, consecutive, increasing
        owned = [j for j, _ in r.blocks]
        assert all(seq.owner(j) == r.rank for j in owned)
    assert sorted(seq.owner(j) for j in range(seq.num_blocks)) == sorted(
        list(range(seq.world_size)) * (2 if seq.zigzag else 1)
    )


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_anchor_shares_partition_the_anchor_and_one_rank_holds_query_keys(seq):
    shares = [seq.anchor_share(r) for r in range(seq.world_size)]
    covered = sum((list(range(s.start, s.stop)) for s in shares), [])
    assert covered == list(range(seq.anchor_len))
    assert sum(r.holds_query_keys for r in seq.ranks()) == 1
    assert seq.owner(seq.num_blocks - 1) == seq.tail_rank


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_scatter_back_inverts_the_layout(seq):
    full = torch.randn(seq.prompt_len, 3)
    locals_ = [full[r.global_indices] for r in seq.ranks()]
    assert torch.equal(seq.scatter_back(locals_), full)


def test_zigzag_ownership():
    seq = SequenceLayout(100, 4, 4, 3, zigzag=True)
    assert [j for j, _ in seq.rank(0).blocks] == [0, 5]
    assert [j for j, _ in seq.rank(2).blocks] == [2, 3]
    assert seq.tail_rank == 0
    assert SequenceLayout(100, 4, 4, 3, zigzag=False).tail_rank == 2


def test_short_context_gives_empty_blocks():
    seq = SequenceLayout(10, 4, 3, 4, zigzag=True)  # 3 context tokens over 8 blocks
    assert [len(s) for s in seq.block_spans] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert seq.rank(3).local_len == 4 + 3


@pytest.mark.parametrize(
    "args, field",
    [((10, 8, 4, 2), r"anchor_len \+ query_len"), ((10, 2, 2, 0), "world_size"), ((10, -1, 2, 2), "anchor_len")],
)
def test_impossible_layouts_raise(args, field):
    with pytest.raises(ValueError, match=field):
        SequenceLayout(*args)
