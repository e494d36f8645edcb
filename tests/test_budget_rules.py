"""Budget rules (issue 34): the forms apbv.anchor / apbv.passing / apbv.passing_schedule take, what they
resolve to against the layout's own block lengths, what `auto` (the shipped default) is, and the errors."""

import math

import pytest
from distributed_utils import prefill_logits_worker, run_on_ranks

from megatron_apbv.apbv.layout import SequenceLayout
from megatron_apbv.runtime.config import AUTO_BUDGETS, ConfigError, resolve_budget
from megatron_apbv.models.resolve import load_config

# 8 system + 10 x 50 video + 20 query = 528 tokens
BASE = ["input.system_tokens=8", "input.video_frames=10", "input.tokens_per_frame=50", "input.query_tokens=20",
        "model.num_layers=3"]


def test_paper_rule_by_name_and_its_multiples():
    assert resolve_budget("paper", 128 * 1024, "anchor") == 2048  # roundup(N/64, 128)
    assert resolve_budget("paper", 128 * 1024, "passing") == 1024  # roundup(N/128, 128)
    assert resolve_budget({"paper": 2}, 4096, "passing") == 256  # twice roundup(4096/128, 128) = 2 x 128
    assert resolve_budget({"paper": 4}, 8000, "passing") == 512
    assert resolve_budget({"paper": 0.5}, 4096, "anchor") == 64
    assert resolve_budget({"paper": 64}, 1000, "anchor") == 1000  # an anchor is capped at the prompt
    # a rule's anchor stops before the query; an anchor in tokens is taken as given
    assert resolve_budget("paper", 144, "anchor", query_len=64) == 80
    assert resolve_budget({"paper": 2}, 1000, "anchor", query_len=100) == 256
    assert resolve_budget({"paper": 64}, 1000, "anchor", query_len=100) == 900
    assert resolve_budget(128, 144, "anchor", query_len=64) == 128


def test_auto_is_the_shipped_default_and_the_shipped_default_is_what_docs_say():
    """`auto` resolves through AUTO_BUDGETS, the one line that sets the default (README "Budgets")."""
    for n in (1000, 4096, 8000, 148_640):
        for kind in ("anchor", "passing"):
            assert resolve_budget("auto", n, kind, block_len=n // 16) == \
                resolve_budget(AUTO_BUDGETS[kind], n, kind, block_len=n // 16)
    assert AUTO_BUDGETS == {"anchor": "paper", "passing": "paper"}  # chosen: keep in step with README
    cfg = load_config(None, BASE)
    assert cfg.apbv.anchor == "auto" and cfg.apbv.setting("passing") == "auto"
    assert (cfg.anchor_len, cfg.passing_lens()) == (128, (128,) * 3)


@pytest.mark.parametrize("world,zigzag,fraction", [(2, True, 0.25), (4, True, 0.125), (3, False, 0.5), (8, True, 1.0)])
def test_block_fraction_follows_the_layouts_longest_block(world, zigzag, fraction):
    variant = "apbv.variant=apbv" if zigzag else "apbv.variant=apb_like"  # apb_like: zigzag off
    cfg = load_config(None, BASE + [f"parallel.context_parallel_size={world}", variant,
                                    f"apbv.passing={{block: {fraction}}}", "apbv.anchor=40"])
    seq = SequenceLayout.from_config(cfg)
    longest = max(len(span) for span in seq.block_spans)
    assert cfg.passing_lens() == (math.ceil(fraction * longest),) * 3
    assert cfg.passing_lens() != (0,) * 3


def test_schedule_mixes_every_form_layer_by_layer():
    cfg = load_config(None, BASE + ["apbv.passing_schedule=[{block: 0.5}, paper, 0.01]", "apbv.anchor={paper: 0.25}"])
    assert cfg.anchor_len == 32  # a quarter of roundup(528/64, 128)
    longest = max(len(s) for s in SequenceLayout.from_config(cfg).block_spans)  # (528 - 32 - 20) / 4 = 119
    assert cfg.passing_lens() == (math.ceil(longest / 2), 128, 6)


@pytest.mark.parametrize("override,message", [
    ("apbv.passing={block: 2}", r"apbv.passing=\{'block': 2\}: block: Input should be less than or equal to 1"),
    ("apbv.passing={block: 0}", r"apbv.passing=\{'block': 0\}: block: Input should be greater than 0"),
    ("apbv.passing={blok: 0.5}", r"apbv.passing=\{'blok': 0.5\}: blok: Extra inputs are not permitted"),
    ("apbv.passing={block: 0.5, paper: 1}", r"apbv.passing=.*set exactly one of paper and block"),
    ("apbv.passing={}", r"apbv.passing=\{\}: set exactly one of paper and block"),
    ("apbv.anchor={paper: 65}", r"apbv.anchor=\{'paper': 65\}: paper: Input should be less than or equal to 64"),
    ("apbv.anchor={block: 0.5}", r"apbv.anchor=\{block: \.\.\.\}: the block is what the anchor leaves"),
    ("apbv.passing_schedule=[8, {paper: -1}, 8]", r"apbv.passing_schedule\[1\]=\{'paper': -1\}"),
    ("apbv.passing=papers", r"apbv.passing: Input should be 'auto', 'paper' or 'all'"),
])
def test_bad_budget_rules_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + [override])


def test_a_block_fraction_needs_the_block():
    with pytest.raises(ConfigError, match=r"a fraction of the block sizes only a passing budget"):
        resolve_budget({"block": 0.5}, 1000, "passing")


def test_rule_anchor_of_a_short_prompt_stops_before_the_query():
    """A job's short request (here 8 + 2 x 36 + 64 = 144 tokens) fits under the rule anchors; a fixed one is refused."""
    short = ["input.system_tokens=8", "input.video_frames=2", "input.tokens_per_frame=36", "input.query_tokens=64"]
    for anchor in ("auto", "paper", "{paper: 2}"):
        cfg = load_config("configs/tiny_cpu.yaml", short + [f"apbv.anchor={anchor}"])
        assert cfg.prompt_len == 144 and cfg.anchor_len == 80
        assert SequenceLayout.from_config(cfg).anchor_len == 80
    with pytest.raises(ConfigError, match="apbv.anchor=128 .* exceeds the prompt"):
        load_config("configs/tiny_cpu.yaml", short + ["apbv.anchor=128"])
    # all anchor, no context block: APB-V on 2 ranks is exact attention there
    record = run_on_ranks(2, prefill_logits_worker, "configs/tiny_cpu.yaml", short + ["apbv.anchor=auto"])
    assert record["block_lens"] == [0, 0, 0, 0] and record["max_abs_logit_diff"] <= 1e-4
