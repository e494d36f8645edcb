"""Real text around the video: the checkpoint's tokenizer and chat template give the system and query ids."""

import pytest
import torch
from distributed_utils import prefill_logits_worker, run_on_ranks

from megatron_apbv.models.inputs import build_prompt
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.models.resolve import load_config

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
# Qwen's turn format; the default system prompt when none is given, as Qwen2's template does.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template=TEMPLATE, special=SPECIAL):
    """A byte-level tokenizer (any text, no merges, no download) with Qwen-style special tokens."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    if chat_template:
        fast.chat_template = chat_template
    return fast


def test_chat_ids_equal_the_whole_rendered_text_tokenized(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    cfg = load_config(None, [
        f"model.tokenizer={tmp_path}", "model.vocab_size=300", "input.video_frames=3", "input.tokens_per_frame=5",
        "input.system_prompt=Watch closely.", "input.question=What moves first? Answer briefly.", "apbv.anchor=4",
    ])
    prompt = build_prompt(cfg)
    pad = tok.convert_tokens_to_ids("<|video_pad|>")
    text = ("<|im_start|>system\nWatch closely.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|video_pad|>" * 15 + "<|vision_end|>What moves first? Answer briefly.<|im_end|>\n"
            "<|im_start|>assistant\n")
    expected = tok(text, add_special_tokens=False)["input_ids"]
    ids = prompt.input_ids[0]
    video = [i for i, t in enumerate(expected) if t == pad]
    # synthetic kind: the 15 context ids are random; everything around them is the template's text
    assert ids.shape[0] == len(expected) == cfg.prompt_len
    assert ids[: video[0]].tolist() == expected[: video[0]]
    assert ids[video[-1] + 1 :].tolist() == expected[video[-1] + 1 :]
    assert (cfg.input.system_tokens, cfg.input.query_tokens) == (video[0], len(expected) - video[-1] - 1)
    assert tok.decode(ids[-cfg.query_len :].tolist()).startswith("<|vision_end|>What moves first?")
    assert tok.decode(ids[-cfg.query_len :].tolist()).endswith("<|im_start|>assistant\n")


def test_without_chat_template_or_system_prompt():
    tok = byte_tokenizer(chat_template=None, special=[])
    from megatron_apbv.models.chat_prompt import render_chat

    text = render_chat(tok, None, "Why?")
    assert text.before == () and text.video_token_id is None
    assert tok.decode(list(text.after)) == "Why?"
    qwen = byte_tokenizer()
    text = render_chat(qwen, None, "Why?")  # Qwen's template adds its default system turn
    assert qwen.decode(list(text.before)).startswith("<|im_start|>system\nYou are helpful.")


def test_text_overrides_keep_the_words_typed():
    from megatron_apbv.runtime.loading import parse_overrides

    tree = parse_overrides(["input.question=Answer: yes or no?", "input.system_prompt=yes", "input.kind=video"])
    assert tree == {"input": {"question": "Answer: yes or no?", "system_prompt": "yes", "kind": "video"}}
    assert parse_overrides(["input.system_prompt=null"]) == {"input": {"system_prompt": None}}


def test_bad_text_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_config(None, ["input.question=Why?"])
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_config(None, [f"model.tokenizer={tmp_path}", "input.question=Why?"])  # no tokenizer files there
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.vocab_size=64"):
        load_config(None, [f"model.tokenizer={tmp_path}", "model.vocab_size=64", "input.question=Why?"])
    with pytest.raises(ConfigError, match="input.question"):
        load_config(None, [f"model.tokenizer={tmp_path}", "input.kind=needle", "input.question=Why?"])


def test_qwen2_5_vl_chat_prompt_matches_transformers(tmp_path):
    """A Qwen2.5-VL checkpoint with its tokenizer and a video file sampled by fps: the chat prompt's ids around
    the encoded video, through APB-V exact mode on 2 ranks (each decoding its own frames), give transformers'
    logits on the same ids, sampled frames and positions (the time step from second_per_grid_ts)."""
    tok = byte_tokenizer()
    vocab = 272
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    hf_cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=0, eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], out_hidden_size=64,
        ),
        video_token_id=ids["<|video_pad|>"], image_token_id=vocab - 1, vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], bos_token_id=0, eos_token_id=ids["<|im_end|>"],
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    from megatron_apbv.models.video import synthetic_video, write_video

    clip = tmp_path / "clip.mp4"
    write_video(clip, synthetic_video(30, 64, 96, seed=9), fps=6, gop=4)  # 5 s
    base = tmp_path / "run.yaml"
    base.write_text(
        f"model: {{checkpoint: {str(tmp_path)!r}}}\n"
        "apbv: {variant: exact, anchor: 8}\n"
        f"input: {{kind: video, video_path: {str(clip)!r}, fps: 1.5, min_pixels: 3136, max_pixels: 4704, "
        "system_prompt: 'Be brief.', question: 'What colour is the sky in the video?'}\n"
    )
    cfg = load_config(base)
    plan = cfg.input.frame_plan(cfg.vision)
    # 5 s x 1.5 fps = 7.5 -> 6 frames (1.2 fps sampled: 5/3 s per group); 64 x 96 -> 56 x 84 (4704 pixels)
    assert (plan.num_frames, plan.size) == (6, (56, 84))
    assert plan.second_per_grid_ts == pytest.approx(2 / 1.2)
    prompt = build_prompt(cfg)
    assert int((prompt.input_ids == ids["<|video_pad|>"]).sum()) == len(prompt.video) == 3 * 2 * 3
    assert int(prompt.input_ids[0, prompt.video.start - 1]) == ids["<|vision_start|>"]
    assert int(prompt.input_ids[0, prompt.video.stop]) == ids["<|vision_end|>"]
    record = run_on_ranks(2, prefill_logits_worker, str(base))
    assert record["prompt_tokens"] == cfg.prompt_len and record["query_len"] == cfg.query_len
    assert record["max_abs_logit_diff"] <= 1e-4

    assert record["video"]["frames"] == 6 and len(record["video"]["decode_seconds_per_rank"]) == 2
    assert record["video"]["second_per_grid_ts"] == pytest.approx(plan.second_per_grid_ts)

    from megatron_apbv.models.vision import patchify_for

    patches, grid = patchify_for(hf.config.vision_config, prompt.frames)
    video_grid_thw = torch.tensor([[grid.groups, grid.height, grid.width]])
    # transformers' 3-D positions from second_per_grid_ts: the video tokens' equal ours (time step
    # tokens_per_second x 5/3 s: groups at 0, 6, 13). After the video, transformers 5 resumes at
    # start + max(h, w) / merge; we keep the original Qwen2.5-VL rule (one past the largest position).
    kinds = (prompt.input_ids == ids["<|video_pad|>"]).int() * 2
    hf_positions, _ = hf.model.get_rope_index(
        prompt.input_ids, mm_token_type_ids=kinds, video_grid_thw=video_grid_thw,
        second_per_grid_ts=torch.tensor([plan.second_per_grid_ts], dtype=torch.float64),
    )
    stop = prompt.video.stop
    assert torch.equal(hf_positions[:, 0, :stop], prompt.position_ids[:, :stop])
    assert prompt.position_ids[0, prompt.video.start :: 6][:3].tolist() == [prompt.video.start + t for t in (0, 6, 13)]
    with torch.no_grad():
        ref = hf(
            input_ids=prompt.input_ids, pixel_values_videos=patches, video_grid_thw=video_grid_thw,
            position_ids=prompt.position_ids[:, None, :],
        ).logits[:, -1].float()
    assert (record["logits"] - ref).abs().max().item() <= 1e-4

