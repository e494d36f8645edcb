"""The model class follows megatron-core: HybridModel from 0.18.0 (0.19 deprecates GPTModel), else GPTModel.

Both hold the same layers and parameters (but the final norm's name) and give the same logits; the
megatron-core 0.19.2 pass of ``make test`` runs this file (and the other Megatron-facing ones) on the
HybridModel path, the main pass on 0.16.1's GPTModel.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.gpt import GPTModel

from megatron_apbv.models.gpt import HybridModel, build_gpt_model, build_rope, final_norm_name, last_token_logits
from megatron_apbv.models.resolve import load_config
from distributed_utils import single_process_groups

CPU = torch.device("cpu")


def _megatron_version() -> tuple[int, int]:
    import megatron.core

    major, minor = megatron.core.__version__.split(".")[:2]
    return int(major), int(minor)


def test_model_class_follows_megatron_core_version():
    with single_process_groups():
        model_cls = type(build_gpt_model(load_config(None, ["apbv.variant=exact"]), method="dense", device=CPU))
    if _megatron_version() >= (0, 18):
        assert HybridModel is not None and model_cls is HybridModel
    else:
        assert HybridModel is None and model_cls is GPTModel


@pytest.mark.skipif(HybridModel is None, reason="megatron-core < 0.18 has no HybridModel")
def test_hybrid_model_equals_gpt_model_on_the_same_weights(monkeypatch):
    """The HybridModel build and a GPTModel build (forced) on the same weights: identical logits."""
    import megatron_apbv.models.gpt as gpt

    cfg = load_config(None, ["apbv.variant=exact", "parallel.context_parallel_size=1"])
    ids = torch.randint(0, cfg.model.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40)
    rope = build_rope(cfg, CPU)
    with single_process_groups():
        hybrid = build_gpt_model(cfg, method="dense", device=CPU)
        monkeypatch.setattr(gpt, "HybridModel", None)  # the GPTModel path of megatron-core < 0.18, for this test
        classic = build_gpt_model(cfg, method="dense", device=CPU)
        assert isinstance(classic, GPTModel) and final_norm_name(hybrid) == "decoder.final_norm"
        renamed = {k.replace("decoder.final_norm.", "decoder.final_layernorm."): v
                   for k, v in hybrid.state_dict().items()}
        classic.load_state_dict(renamed, strict=True)
        a, b = last_token_logits(hybrid, rope, ids, pos), last_token_logits(classic, rope, ids, pos)
    assert torch.equal(a, b)
