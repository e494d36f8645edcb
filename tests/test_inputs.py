"""The main job on real inputs: a video encoded over the group, and a Hugging Face checkpoint."""

from pathlib import Path

import pytest
import torch
from distributed_utils import prefill_logits_worker, run_on_ranks

from megatron_apbv.inference.prefill import run_prefill
from megatron_apbv.models.inputs import build_prompt
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
from megatron_apbv.models.resolve import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
VIDEO = ["input.kind=video", "input.video_frames=12", "input.frame_size=[56, 112]", "model.mrope_section=[2, 3, 3]"]


def _worker(rank, world, overrides):
    cfg = load_config(CONFIG, overrides + [f"parallel.context_parallel_size={world}"])
    init_distributed(cfg, LaunchEnv(rank, world, rank), torch.device("cpu"))
    try:
        return run_prefill(cfg, LaunchEnv(rank, world, rank), torch.device("cpu"), compare="dense")
    finally:
        shutdown()


@pytest.mark.parametrize("world", [2, 3])
def test_video_prompt_exact_mode_equals_dense(world):
    record = run_on_ranks(world, _worker, VIDEO + ["apbv.variant=exact", "apbv.anchor=8"])
    assert record["prompt_tokens"] == 16 + 6 * 2 * 4 + 20  # 6 temporal groups of 2x4 merged patches
    assert record["max_abs_logit_diff"] <= 1e-4 and record["top1_agree"], record


def test_video_prompt_layout_and_positions():
    cfg = load_config(CONFIG, VIDEO)
    prompt = build_prompt(cfg)
    assert prompt.frames.shape == (12, 56, 112, 3) and prompt.frames.dtype == torch.uint8
    assert (prompt.video.start, prompt.video.stop) == (16, 64)
    assert prompt.position_ids.shape == (3, cfg.prompt_len)
    assert bool((prompt.input_ids[0, 16:64] == cfg.model.vocab_size - 1).all())


def test_bad_frame_size_is_a_config_error():
    with pytest.raises(ConfigError, match="input.frame_size"):
        load_config(CONFIG, VIDEO[:1] + ["input.frame_size=[50, 56]"])


def test_hf_checkpoint_runs_and_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    overrides = [f"model.checkpoint={tmp_path}", "apbv.variant=exact"]
    # the file's shape keys that disagree with config.json must be removed: here init_std etc. stay
    with pytest.raises(ConfigError, match="disagrees with the checkpoint"):
        load_config(CONFIG, overrides)
    base = tmp_path / "base.yaml"
    base.write_text("apbv: {anchor: 32, passing: 8}\ninput: {system_tokens: 16, video_frames: 4, tokens_per_frame: 36, query_tokens: 20}\n")
    cfg = load_config(base, overrides)
    assert cfg.model.num_layers == 2 and cfg.model.rope_theta == 10000.0
    record = run_on_ranks(2, prefill_logits_worker, str(base), overrides)
    with torch.no_grad():
        ref = hf(build_prompt(cfg).input_ids).logits[:, -1].float()
    assert record["max_abs_logit_diff"] <= 1e-4
    assert (record["logits"] - ref).abs().max().item() <= 1e-4


def test_qwen2_5_vl_checkpoint_video_matches_transformers(tmp_path):
    """Language model and vision tower from one Qwen2.5-VL checkpoint; APB-V exact mode on 2 ranks
    gives the logits of transformers' own Qwen2.5-VL on the same frames and prompt."""
    transformers = pytest.importorskip("transformers")
    vocab = 256
    hf_cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], out_hidden_size=64,
        ),
        video_token_id=vocab - 1, image_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    base = tmp_path / "run.yaml"
    base.write_text(
        f"model: {{checkpoint: {str(tmp_path)!r}}}\n"
        "apbv: {variant: exact, anchor: 8}\n"
        "input: {kind: video, system_tokens: 6, video_frames: 6, frame_size: [56, 84], query_tokens: 5}\n"
    )
    cfg = load_config(base)
    assert cfg.vision.hidden_size == 32 and cfg.model.mrope_section == [2, 3, 3]
    record = run_on_ranks(2, prefill_logits_worker, str(base), [])
    assert record["max_abs_logit_diff"] <= 1e-4

    from megatron_apbv.models.vision import patchify_for

    prompt = build_prompt(cfg)
    patches, grid = patchify_for(hf.config.vision_config, prompt.frames)
    with torch.no_grad():
        ref = hf(
            input_ids=prompt.input_ids, pixel_values_videos=patches,
            video_grid_thw=torch.tensor([[grid.groups, grid.height, grid.width]]),
            # our 3-D positions (one temporal group = one step of t); transformers would derive them
            # from vision-start markers, which the tokenizer-free prompt does not have
            position_ids=prompt.position_ids[:, None, :],
        ).logits[:, -1].float()
    assert (record["logits"] - ref).abs().max().item() <= 1e-4


def test_generate_prints_text_with_the_checkpoints_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(256)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    )
    hf_cfg = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(hf_cfg).save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    base = tmp_path / "gen.yaml"
    base.write_text(
        f"model: {{checkpoint: {str(tmp_path)!r}}}\napbv: {{anchor: 16, passing: 4}}\n"
        "input: {system_tokens: 8, video_frames: 4, tokens_per_frame: 16, query_tokens: 8}\n"
        "generate: {max_new_tokens: 5}\n"
    )
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 255}')  # a token it does not emit here
    record = run_on_ranks(2, _generate_worker, str(base))
    ids = record["generated_ids"][0]
    assert len(ids) == 5 and 255 not in ids and record["stop_ids"] == [255]
    assert record["generated_text"][0] == "".join(f"w{i}" for i in ids)  # a WordLevel decoder joins tokens
    # the checkpoint's end-of-sequence id ends the generation (generation_config.json, as transformers reads it)
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [{ids[2]}, 254]}}')
    stopped = run_on_ranks(2, _generate_worker, str(base))
    assert stopped["generated_ids"][0] == ids[: ids.index(ids[2]) + 1] and stopped["stop_ids"] == sorted({ids[2], 254})


def _generate_worker(rank, world, path):
    from argparse import Namespace

    from megatron_apbv.inference.generate import command

    cfg = load_config(path, [f"parallel.context_parallel_size={world}"])
    env = LaunchEnv(rank, world, rank)
    init_distributed(cfg, env, torch.device("cpu"))
    try:
        return command(Namespace(), cfg, env, torch.device("cpu"))
    finally:
        shutdown()
