"""Sampling controls: Hugging Face's logits-processor semantics (a loop reference written here, and transformers'
own processors), seeding, the penalty history, and generation_config.json defaults."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_apbv.inference.sampling import Sampler
from megatron_apbv.models.hf_config import checkpoint_sampling_defaults
from megatron_apbv.runtime.config import ConfigError, GenerateConfig
from megatron_apbv.models.resolve import load_config

VOCAB = 40


def reference_probs(logits, seen, temperature, top_k, top_p, penalty):
    """One row, plain Python floats: penalty, temperature, top-k (ties kept), top-p (HF's ascending rule)."""
    x = [v / penalty if (i in seen and v >= 0) else v * penalty if i in seen else v for i, v in enumerate(logits)]
    x = [v / temperature for v in x]
    if top_k:
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    if top_p < 1:
        m = max(x)
        p = [math.exp(v - m) for v in x]
        z = sum(p)
        p = [v / z for v in p]
        order = sorted(range(len(x)), key=lambda i: p[i])  # ascending, as transformers' TopPLogitsWarper
        cumulative, removed = 0.0, set()
        for i in order[:-1]:  # the most likely id is always kept
            cumulative += p[i]
            if cumulative <= 1 - top_p:
                removed.add(i)
        x = [-math.inf if i in removed else v for i, v in enumerate(x)]
    m = max(x)
    e = [math.exp(v - m) for v in x]
    return [v / sum(e) for v in e]


SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=0.7, top_k=5, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.8, repetition_penalty=1.0),
    dict(temperature=0.9, top_k=12, top_p=0.6, repetition_penalty=1.3),
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=0.7),  # < 1 favours repeats
    dict(temperature=0.5, top_k=1, top_p=0.9, repetition_penalty=2.0),
]


def _inputs(seed=0, batch=3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=gen, dtype=torch.float64) * 3
    prompt = torch.randint(0, VOCAB, (batch, 15), generator=gen)
    return logits, prompt


@pytest.mark.parametrize("settings", SETTINGS)
def test_distribution_equals_the_reference(settings):
    logits, prompt = _inputs()
    sampler = Sampler(GenerateConfig(**settings), seed=0, prompt_ids=prompt)
    probs = sampler.scores(logits).softmax(-1)
    for row in range(logits.shape[0]):
        ref = reference_probs(logits[row].tolist(), set(prompt[row].tolist()), settings["temperature"],
                              settings["top_k"], settings["top_p"], settings["repetition_penalty"])
        torch.testing.assert_close(probs[row], torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("settings", SETTINGS)
def test_distribution_equals_transformers_processors(settings):
    generation = pytest.importorskip("transformers.generation.logits_process")
    logits, prompt = _inputs(seed=1)
    processors = [
        generation.RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]),
        generation.TemperatureLogitsWarper(settings["temperature"]),
    ]
    if settings["top_k"]:
        processors.append(generation.TopKLogitsWarper(settings["top_k"]))
    if settings["top_p"] < 1:
        processors.append(generation.TopPLogitsWarper(settings["top_p"]))
    scores = logits.clone()
    for proc in processors:
        scores = proc(prompt, scores)
    ours = Sampler(GenerateConfig(**settings), seed=0, prompt_ids=prompt).scores(logits)
    assert torch.equal(torch.isinf(ours), torch.isinf(scores))  # the same ids filtered
    torch.testing.assert_close(ours.softmax(-1), scores.softmax(-1), atol=1e-12, rtol=0)


def test_greedy_applies_the_penalty_and_records_history():
    logits = torch.tensor([[5.0, 4.9, 1.0, -3.0]])
    greedy = GenerateConfig(temperature=0.0, repetition_penalty=1.5)
    assert int(Sampler(GenerateConfig(temperature=0.0), 0)(logits)) == 0
    # id 0 is in the prompt: 5 / 1.5 < 4.9
    assert int(Sampler(greedy, 0, prompt_ids=torch.tensor([[0, 3]]))(logits)) == 1
    # every returned id joins the history: 0, then 1 (5 / 1.5 < 4.9), then 0 again (5 / 1.5 > 4.9 / 1.5)
    sampler = Sampler(greedy, 0)
    assert [int(sampler(logits)) for _ in range(3)] == [0, 1, 0]


def test_sampling_is_seeded_and_stays_in_the_kept_set():
    logits, prompt = _inputs(seed=2, batch=2)
    settings = GenerateConfig(temperature=1.0, top_k=3)

    def draws(seed):
        sampler = Sampler(settings, seed, prompt_ids=prompt)
        return torch.stack([sampler(logits) for _ in range(50)])

    a, b, c = draws(7), draws(7), draws(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    top3 = logits.topk(3, dim=-1).indices
    assert all(bool(torch.isin(a[:, r], top3[r]).all()) for r in range(2))
    assert len(set(a[:, 0].tolist())) > 1  # it samples


def test_generation_config_json_sets_the_defaults(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1).to_json_file(tmp_path / "config.json")
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}))
    cfg = load_config(None, [f"model.checkpoint={tmp_path}", "input.video_frames=4"])
    g = cfg.generate
    assert (g.temperature, g.top_p, g.top_k, g.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    cfg = load_config(None, [f"model.checkpoint={tmp_path}", "input.video_frames=4", "generate.top_k=0",
                             "generate.temperature=0"])
    assert (cfg.generate.temperature, cfg.generate.top_k, cfg.generate.top_p) == (0.0, 0, 0.8)  # explicit wins
    # without do_sample, transformers decodes greedily: so do we
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 20}))
    assert checkpoint_sampling_defaults(str(tmp_path)) == {"temperature": 0.0, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0}))
    with pytest.raises(ConfigError, match="generate.top_p"):
        load_config(None, [f"model.checkpoint={tmp_path}", "input.video_frames=4"])
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json"):
        load_config(None, [f"model.checkpoint={tmp_path}", "input.video_frames=4"])
    # no file, no setting: the neutral values
    assert Sampler(load_config(None, []).generate, 0).__dict__.items() >= {
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "penalty": 1.0}.items()
