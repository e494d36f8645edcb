"""Hugging Face safetensors checkpoints -> our Megatron GPTModel.

Tiny randomly initialised ``transformers`` models (no download) are saved with
``save_pretrained`` and loaded; the loaded model's logits must match the
Hugging Face model's. Tensor-parallel shards are checked against slices that
this file computes independently of the loader.
"""

import json
import math

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from distributed_utils import run_on_ranks, single_process_groups  # noqa: E402

from megatron_apbv.methods import METHODS  # noqa: E402
from megatron_apbv.models.checkpoint import load_hf_checkpoint  # noqa: E402
from megatron_apbv.models.hf_config import CheckpointError, model_config_from_hf  # noqa: E402
from megatron_apbv.models.gpt import build_gpt_model, build_rope, final_norm_name, last_token_logits  # noqa: E402
from megatron_apbv.runtime.config import RunConfig  # noqa: E402
from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown  # noqa: E402

CPU = torch.device("cpu")
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)


# Helpers -------------------------------------------------------------------------------------


def hf_causal_lm(family: str, tie: bool, seed: int = 0):
    """A tiny random Qwen2 (Q/K/V biases) or Llama model, fp32, eval mode."""
    torch.manual_seed(seed)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**SIZES, rope_theta=50000.0, tie_word_embeddings=tie)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**SIZES, rope_theta=20000.0, tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF zero-initialises biases and ones the norms: randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


def hf_vl(seed: int = 0):
    """A tiny random Qwen2.5-VL (one vision block)."""
    torch.manual_seed(seed)
    text = {k: v for k, v in SIZES.items()}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=32,
                           fullatt_block_indexes=[0]),
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).float().eval()


def save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return json.loads((path / "config.json").read_text())


def run_config(hf_config: dict, tp: int = 1) -> RunConfig:
    return RunConfig.model_validate({
        "model": model_config_from_hf(hf_config),
        "parallel": {"context_parallel_size": 1, "tensor_parallel_size": tp},
        "input": {"system_tokens": 0, "video_frames": 0, "query_tokens": 8},
        "apbv": {"anchor": 0},
        "dtype": "float32",
    })


@pytest.fixture(scope="module")
def megatron_single():
    with single_process_groups():
        yield


@torch.inference_mode()
def all_logits(model, rope, ids, positions):
    """Logits of every position ``[b, s, vocab]`` (TP=1)."""
    hidden = model.embedding(input_ids=ids, position_ids=None)
    hidden = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope(positions))
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return logits.transpose(0, 1).float()


def load_ours(path, hf_config):
    cfg = run_config(hf_config)
    model = build_gpt_model(cfg, method="dense", device=CPU)
    report = load_hf_checkpoint(model, path)
    return model, build_rope(cfg, CPU), report


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# model_config_from_hf ----------------------------------------------------------------------


def test_config_mapping_qwen2_and_llama():
    qwen = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": 131072, "rope_scaling": None}
    assert model_config_from_hf(qwen) == dict(
        num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4, kv_channels=128,
        ffn_hidden_size=18944, vocab_size=152064, rope_theta=1e6, norm_epsilon=1e-6, qkv_bias=True,
        tie_embeddings=False,
    )
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
             "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
             "vocab_size": 128256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "attention_bias": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    got = model_config_from_hf(llama)
    assert got["qkv_bias"] is False and got["tie_embeddings"] is True
    assert got["rope_theta"] == 500000.0 and got["kv_channels"] == 64 and got["norm_epsilon"] == 1e-5
    assert "mrope_section" not in got


@pytest.mark.parametrize("nested", [False, True])
def test_config_mapping_qwen2_5_vl(nested):
    text = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
            "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    top = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
           "tie_word_embeddings": True, "vision_config": {"depth": 32, "hidden_size": 1280}}
    hf = {**top, "text_config": text} if nested else {**top, **text}
    got = model_config_from_hf(hf)
    assert got["mrope_section"] == [16, 24, 24] and got["kv_channels"] == 128 and got["num_layers"] == 36
    assert got["qkv_bias"] is True and got["tie_embeddings"] is True and got["rope_theta"] == 1e6
    RunConfig.model_validate({"model": got, "parallel": {"context_parallel_size": 1}})  # a valid model section


@pytest.mark.parametrize("change, words", [
    ({"architectures": ["MistralForCausalLM"]}, ["MistralForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM",
                                                 "Qwen2_5_VLForConditionalGeneration"]),
    ({"use_sliding_window": True}, ["use_sliding_window"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["yarn"]),
    ({"hidden_act": "gelu"}, ["gelu"]),
])
def test_config_mapping_rejects(change, words):
    hf = {"architectures": ["Qwen2ForCausalLM"], **SIZES, **change}
    with pytest.raises(ValueError) as err:
        model_config_from_hf(hf)
    for word in words:
        assert word in str(err.value)


# Loading: logits equal Hugging Face's --------------------------------------------------------


@pytest.mark.parametrize("family, tie", [("qwen2", False), ("qwen2", True), ("llama", False), ("llama", True)])
def test_logits_match_hugging_face(megatron_single, tmp_path, family, tie):
    hf = hf_causal_lm(family, tie)
    hf_config = save(hf, tmp_path)
    assert hf_config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[family]]
    model, rope, report = load_ours(tmp_path, hf_config)
    assert model.share_embeddings_and_output_weights is tie
    assert sorted(report.parameters) == sorted(n for n, _ in model.named_parameters())

    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 17))
    positions = torch.arange(ids.shape[1])
    with torch.no_grad():
        ref = hf(ids).logits.float()
    ours_last = last_token_logits(model, rope, ids, positions)
    assert (ours_last - ref[:, -1]).abs().max().item() <= 1e-4
    assert (all_logits(model, rope, ids, positions) - ref).abs().max().item() <= 1e-4


def test_qwen2_5_vl_language_model(megatron_single, tmp_path):
    hf = hf_vl()
    hf_config = save(hf, tmp_path)
    model, rope, report = load_ours(tmp_path, hf_config)
    assert report.ignored and all(n.startswith(("visual.", "model.visual.")) for n in report.ignored)

    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 13))  # text only: every mrope axis is the text position
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    ours = all_logits(model, rope, ids, torch.arange(13).expand(3, -1))
    assert (ours - ref).abs().max().item() <= 1e-4

    # The language model's names come with several prefixes across transformers versions and exporters.
    tensors = load_file(tmp_path / "model.safetensors")
    for lm, head, visual in [("model.language_model.", "lm_head.", "model.visual."),
                             ("language_model.model.", "language_model.lm_head.", "visual.")]:
        renamed = {}
        for name, t in tensors.items():
            if name.startswith("visual."):
                renamed[visual + name[len("visual."):]] = t
            elif name.startswith("lm_head."):
                renamed[head + name[len("lm_head."):]] = t
            else:
                renamed[lm + name[len("model."):]] = t
        variant = tmp_path / lm.strip(".").replace(".", "_")
        variant.mkdir()
        save_file(renamed, variant / "model.safetensors")
        other, _, _ = load_ours(variant, hf_config)
        for name, p in other.named_parameters():
            torch.testing.assert_close(p, dict(model.named_parameters())[name], rtol=0, atol=0)


def test_sharded_checkpoint(megatron_single, tmp_path):
    hf = hf_causal_lm("qwen2", tie=False)
    hf_config = save(hf, tmp_path / "one")
    save(hf, tmp_path / "sharded", max_shard_size="40KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file() and len(shards) > 1
    one, _, _ = load_ours(tmp_path / "one", hf_config)
    many, _, report = load_ours(tmp_path / "sharded", hf_config)
    assert len(report.files) == len(shards)
    for name, p in many.named_parameters():
        torch.testing.assert_close(p, dict(one.named_parameters())[name], rtol=0, atol=0)


# Bad checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, words", [
    ("missing", ["model.layers.1.self_attn.k_proj.weight", "missing", "[32, 64]"]),
    ("shape", ["model.layers.0.mlp.up_proj.weight", "[96, 64]", "[95, 64]"]),
    ("extra", ["model.layers.2.self_attn.o_proj.weight", "unexpected"]),
    ("bias", ["model.layers.0.self_attn.o_proj.bias", "unexpected"]),
    ("lm_head", ["lm_head.weight", "missing", "tie_embeddings"]),
])
def test_bad_checkpoints_name_the_tensor(megatron_single, tmp_path, damage, words):
    hf = hf_causal_lm("qwen2", tie=False)
    hf_config = save(hf, tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "model.safetensors")
    if damage == "missing":
        del tensors["model.layers.1.self_attn.k_proj.weight"]
    elif damage == "shape":
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:95].clone()
    elif damage == "extra":
        tensors["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(64, 64)
    elif damage == "bias":
        tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    else:
        del tensors["lm_head.weight"]
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors")

    model = build_gpt_model(run_config(hf_config), method="dense", device=CPU)
    before = params(model)
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(model, tmp_path / "bad")
    for word in words:
        assert word in str(err.value), str(err.value)
    for name, p in model.named_parameters():  # nothing was written
        assert torch.equal(p, before[name])


def test_tied_model_accepts_only_an_equal_lm_head(megatron_single, tmp_path):
    hf_config = save(hf_causal_lm("qwen2", tie=True), tmp_path / "tied")
    tensors = load_file(tmp_path / "tied" / "model.safetensors")
    model = build_gpt_model(run_config(hf_config), method="dense", device=CPU)
    for head, ok in [(tensors["model.embed_tokens.weight"].clone(), True), (torch.zeros(128, 64), False)]:
        path = tmp_path / f"head_{ok}"
        path.mkdir()
        save_file({**tensors, "lm_head.weight": head}, path / "model.safetensors")
        if ok:
            load_hf_checkpoint(model, path)
        else:
            with pytest.raises(CheckpointError, match="lm_head.weight"):
                load_hf_checkpoint(model, path)


def test_no_checkpoint_and_wrong_tp(megatron_single, tmp_path):
    hf_config = save(hf_causal_lm("llama", tie=True), tmp_path)
    model = build_gpt_model(run_config(hf_config), method="dense", device=CPU)
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        load_hf_checkpoint(model, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="tp_size=2"):
        load_hf_checkpoint(model, tmp_path, tp_rank=0, tp_size=2)


# Tensor parallelism ---------------------------------------------------------------------------


def _tp_worker(rank, world, path, hf_config, ids):
    cfg = run_config(hf_config, tp=world)
    init_distributed(cfg, LaunchEnv(rank, world, rank), CPU)
    try:
        model = build_gpt_model(cfg, method="apbv", device=CPU)
        load_hf_checkpoint(model, path, tp_rank=rank, tp_size=world)
        shards = [None] * world
        dist.all_gather_object(shards, params(model))
        # The same TP=2 layer with dense causal attention runs the whole prompt: logits against HF's.
        dense = build_gpt_model(cfg, method="apbv", device=CPU, layer_spec=METHODS["dense"].layer_spec())
        load_hf_checkpoint(dense, path, tp_rank=rank, tp_size=world)
        logits = last_token_logits(dense, build_rope(cfg, CPU), ids, torch.arange(ids.shape[1]))
        return {"shards": shards, "logits": logits, "final_norm": final_norm_name(model)}
    finally:
        shutdown()


def _expected_tp_shards(hf_state: dict, rank: int, tp: int, final_norm: str, nh=4, ng=2, hd=16) -> dict:
    """Megatron's TP shards of the HF weights, built head by head (independently of the loader)."""
    def part(t, dim):
        n = t.shape[dim] // tp
        return t.narrow(dim, rank * n, n)

    out = {"embedding.word_embeddings.weight": part(hf_state["model.embed_tokens.weight"], 0),
           "output_layer.weight": part(hf_state["lm_head.weight"], 0),
           f"{final_norm}.weight": hf_state["model.norm.weight"]}
    for i in range(2):
        hf, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (hf_state[f"{hf}self_attn.{x}_proj.{kind}"] for x in "qkv")
            rows = []
            for g in range(ng):  # the whole model's fused QKV: per group its q heads, its k head, its v head
                for head in range(g * (nh // ng), (g + 1) * (nh // ng)):
                    rows.append(q[head * hd:(head + 1) * hd])
                rows += [k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
            out[f"{ours}self_attention.linear_qkv.{kind}"] = part(torch.cat(rows), 0)  # whole groups per rank
        out[f"{ours}self_attention.linear_proj.weight"] = part(hf_state[f"{hf}self_attn.o_proj.weight"], 1)
        out[f"{ours}mlp.linear_fc1.weight"] = torch.cat([part(hf_state[f"{hf}mlp.gate_proj.weight"], 0),
                                                        part(hf_state[f"{hf}mlp.up_proj.weight"], 0)])
        out[f"{ours}mlp.linear_fc2.weight"] = part(hf_state[f"{hf}mlp.down_proj.weight"], 1)
        out[f"{ours}input_layernorm.weight"] = hf_state[f"{hf}input_layernorm.weight"]
        out[f"{ours}pre_mlp_layernorm.weight"] = hf_state[f"{hf}post_attention_layernorm.weight"]
    return out


def test_tensor_parallel_shards(tmp_path):
    hf = hf_causal_lm("qwen2", tie=False)
    hf_config = save(hf, tmp_path)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 11))
    result = run_on_ranks(2, _tp_worker, tmp_path, hf_config, ids)
    hf_state = load_file(tmp_path / "model.safetensors")
    for rank, got in enumerate(result["shards"]):
        expected = _expected_tp_shards(hf_state, rank, 2, result["final_norm"])
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (rank, name)
    with torch.no_grad():
        ref = hf(ids).logits[:, -1].float()
    assert (result["logits"] - ref).abs().max().item() <= 1e-4
    assert math.isfinite(result["logits"].sum().item())


def test_building_from_a_checkpoint_never_initialises_randomly(megatron_single, tmp_path, monkeypatch):
    """With model.checkpoint the model is built on the meta device: no initialiser runs, the weights are the file's."""
    import megatron.core.tensor_parallel.layers as tp_layers

    hf = hf_causal_lm("qwen2", tie=False)
    hf_config = save(hf, tmp_path / "ckpt")
    calls = []

    def spy(name, original):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return wrapped

    for name in ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                 "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, name, spy(name, getattr(torch.nn.init, name)))
    for name in ("normal_", "uniform_"):
        monkeypatch.setattr(torch.Tensor, name, spy("Tensor." + name, getattr(torch.Tensor, name)))
    for name in ("_initialize_affine_weight_cpu", "_initialize_affine_weight_gpu"):
        monkeypatch.setattr(tp_layers, name, spy(name, getattr(tp_layers, name)))

    cfg = run_config(hf_config)
    build_gpt_model(cfg, method="dense", device=CPU)
    assert calls, "the spies must see Megatron's random initialisation of a model without checkpoint"
    calls.clear()
    folder = str(tmp_path / "ckpt")
    with_checkpoint = cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": folder})})
    timings = {}
    model = build_gpt_model(with_checkpoint, method="dense", device=CPU, timings=timings)
    assert calls == []
    assert set(timings) == {"build_seconds", "load_seconds"}
    expected, _, _ = load_ours(tmp_path / "ckpt", hf_config)
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(expected.named_parameters())[name]), name
