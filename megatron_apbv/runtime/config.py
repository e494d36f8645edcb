"""YAML run configuration: model shape, APB-V settings, parallelism, input, dtype.

Configs are validated pydantic models (pydantic already comes with DeepSpeed).
Every check that can fail runs before any process group is touched, on every
rank, with a message naming the field, the value and what is allowed: a wrong
config can never leave some ranks waiting in a collective.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, confloat, model_validator

Ratio = confloat(gt=0.0, le=1.0)
Count = Annotated[int, Field(strict=True, ge=0)]
# A budget is a token count (int), a fraction of the prompt length (float in (0, 1]) or a named rule.
AnchorBudget = Union[Count, Ratio, Literal["auto"]]
PassingBudget = Union[Count, Ratio, Literal["auto", "all"]]

VARIANTS = {
    # variant: settings it fixes (spec "Variants as configuration, not copies")
    "apbv": {"zigzag": True, "overlap": True},
    "apb_like": {"zigzag": False, "overlap": False},
    "star": {"passing": 0},
    "exact": {"passing": "all"},
}


def without_variant_settings(apbv: dict, variant: str) -> dict:
    """``apbv`` settings minus those ``variant`` fixes: a newly chosen variant replaces them (command line, bench)."""
    fixed = set(VARIANTS[variant]) | ({"passing_schedule"} if "passing" in VARIANTS[variant] else set())
    return {k: v for k, v in apbv.items() if k not in fixed}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Qwen2/Llama-style decoder: RMSNorm, SwiGLU, GQA, RoPE."""

    num_layers: int = Field(2, ge=1, le=100_000)  # bounded: one passing budget is resolved per layer
    hidden_size: int = Field(64, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_query_groups: int = Field(2, ge=1, description="KV heads (GQA groups)")
    kv_channels: Optional[int] = Field(None, ge=1, description="head dim; default hidden_size / heads")
    ffn_hidden_size: int = Field(128, ge=1)
    vocab_size: int = Field(256, ge=2)
    rope_theta: float = Field(1_000_000.0, gt=0, allow_inf_nan=False)
    mrope_section: Optional[list[int]] = Field(None, description="Qwen2.5-VL 3-D RoPE sections (t, h, w)")
    norm_epsilon: float = Field(1e-6, gt=0, allow_inf_nan=False)
    qkv_bias: StrictBool = True
    tie_embeddings: StrictBool = False
    max_position_embeddings: int = Field(1 << 20, ge=1)
    init_std: float = Field(0.02, gt=0, allow_inf_nan=False, description="std of the random initial weights")
    checkpoint: Optional[str] = Field(
        None, description="Hugging Face safetensors checkpoint dir; the shape keys default to its config.json"
    )
    tokenizer: Optional[str] = Field(
        None, description="tokenizer dir for input.question (default: model.checkpoint)"
    )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def tokenizer_dir(self) -> Optional[str]:
        """Where the tokenizer files are: ``tokenizer``, else the checkpoint's own directory."""
        return self.tokenizer or self.checkpoint

    @model_validator(mode="after")
    def _check_shape(self):
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}: pick KV groups that divide the heads"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}: set model.kv_channels explicitly or change the sizes"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE: change model.kv_channels")
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"model.mrope_section={self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        return self


class APBVConfig(_Section):
    """APB-V settings. ``variant`` fixes some of them; setting them as well is a conflict."""

    variant: Literal["apbv", "apb_like", "star", "exact"] = "apbv"
    anchor: AnchorBudget = Field("auto", description="tokens, fraction of N, or auto = roundup(N/64, 128)")
    passing: Optional[PassingBudget] = Field(
        None, description="keys per KV head per block: tokens, fraction of N, auto = roundup(N/128, 128), all"
    )
    passing_schedule: Optional[list[PassingBudget]] = Field(None, description="per-layer passing budgets")
    window: int = Field(5, ge=1, description="max-pool smoothing window of the scores (odd)")
    zigzag: Optional[StrictBool] = None
    overlap: Optional[StrictBool] = None

    @model_validator(mode="after")
    def _check(self):
        if self.window % 2 == 0:
            raise ValueError(f"apbv.window={self.window} must be odd (the pool is centred): use {self.window + 1}")
        for key, fixed in VARIANTS[self.variant].items():
            given = getattr(self, key)
            if given is not None and given != fixed:
                raise ValueError(
                    f"apbv.{key}={given!r} contradicts apbv.variant={self.variant!r}, which sets "
                    f"{key}={fixed!r}: remove apbv.{key} or choose another variant"
                )
        if self.passing_schedule is not None and self.variant in ("star", "exact"):
            raise ValueError(f"apbv.passing_schedule cannot be combined with apbv.variant={self.variant!r}")
        return self

    def setting(self, key: str):
        """``zigzag`` / ``overlap`` / ``passing`` after the variant and the defaults are applied."""
        value = getattr(self, key)
        if value is None:
            value = VARIANTS[self.variant].get(key, {"zigzag": True, "overlap": True, "passing": "auto"}[key])
        return value


class ParallelConfig(_Section):
    context_parallel_size: int = Field(2, ge=1, description="size of the APB-V group")
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: Optional[int] = Field(
        None, ge=1,
        description="APB-V replicas serving different requests (apbv infer); null = world / (CP x TP)",
    )
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_seconds: int = Field(600, ge=1, description="timeout of every collective")


class VisionConfig(_Section):
    """Qwen2.5-VL vision tower (``input.kind: video``); its output width is ``model.hidden_size``."""

    depth: int = Field(2, ge=1)
    hidden_size: int = Field(64, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=1)
    patch_size: int = Field(14, ge=1)
    spatial_merge_size: int = Field(2, ge=1)
    temporal_patch_size: int = Field(2, ge=1)
    window_size: int = Field(112, ge=1)
    fullatt_block_indexes: list[int] = Field(default_factory=lambda: [1])
    tokens_per_second: float = Field(4.0, gt=0, allow_inf_nan=False, description="temporal RoPE steps per second")

    def tokens_per_group(self, frame_size: tuple[int, int]) -> int:
        """Video tokens of one temporal group (``temporal_patch_size`` frames)."""
        unit = self.patch_size * self.spatial_merge_size
        return (frame_size[0] // unit) * (frame_size[1] // unit)


class InputConfig(_Section):
    """The prompt ``[system | video | question]``; the question (+ assistant header) is the query span.

    ``kind: synthetic`` uses random token ids for everything (``tokens_per_frame``
    ids per frame); ``kind: video`` encodes frames (``video_path``, or a seeded
    synthetic video when null) with the vision tower over the APB-V group.
    """

    kind: Literal["synthetic", "video", "needle"] = "synthetic"
    system_tokens: int = Field(
        16, ge=0, description="random ids before the video (set by the text with input.question)"
    )
    video_frames: int = Field(8, ge=0)
    tokens_per_frame: int = Field(32, ge=1, description="synthetic kind only")
    video_path: Optional[str] = Field(None, description="video kind: a file PyAV can decode; null = synthetic video")
    frame_size: tuple[int, int] = Field((56, 56), description="video kind: frames are resized to (H, W)")
    seconds_per_frame: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False,
        description="time between sampled frames; sets the temporal RoPE step (null: one step per temporal group)",
    )
    query_tokens: int = Field(
        16, ge=1, description="question + assistant header: the query span Q (set by the text with input.question)"
    )
    batch_size: int = Field(1, ge=1)
    # Real text instead of random ids: rendered by model.tokenizer's chat template, which then sets
    # system_tokens and query_tokens (megatron_apbv/models/chat_prompt.py).
    system_prompt: Optional[str] = Field(None, description="system turn text (with input.question)")
    question: Optional[str] = Field(None, min_length=1, description="the user's question after the video")

    def video_tokens(self, vision: VisionConfig) -> int:
        if self.kind != "video":  # synthetic and needle: tokens_per_frame tokens per frame
            return self.video_frames * self.tokens_per_frame
        groups = -(-self.video_frames // vision.temporal_patch_size)
        return groups * vision.tokens_per_group(self.frame_size)


class NeedleConfig(_Section):
    """Video-needle benchmark (``input.kind: needle``, ``apbv eval``); see megatron_apbv/eval/needle.py."""

    frame_size: tuple[int, int] = Field((16, 24), description="frame (H, W) in pixels")
    patch_size: int = Field(4, ge=1, description="patch side; tokens_per_frame = (H/patch) * (W/patch)")
    cards: tuple[int, int] = Field((2, 5), description="min, max scene cards per video")
    distractor_rate: float = Field(0.25, ge=0.0, le=1.0, description="fraction of frames with a distractor")
    checkpoint: Optional[str] = Field("checkpoints/needle/needle.safetensors", description="trained weights")
    eval_examples: int = Field(64, ge=1, description="held-out examples apbv eval scores")
    eval_batch: int = Field(8, ge=1)
    budgets: list[Ratio] = Field(default_factory=lambda: [1 / 256, 1 / 128, 1 / 64], description="p / N")
    demo_index: int = Field(0, ge=0, description="held-out example of apbv eval --demo")


class GenerateConfig(_Section):
    """Decoding after the prefill (``apbv generate``)."""

    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop_ids: list[int] = Field(default_factory=list, description="token ids that end the generation")
    stop_at_eos: StrictBool = Field(
        True, description="also stop at model.checkpoint's end-of-sequence ids (generation_config.json, config.json)"
    )


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    apbv: APBVConfig = APBVConfig()
    parallel: ParallelConfig = ParallelConfig()
    input: InputConfig = InputConfig()
    vision: VisionConfig = VisionConfig()
    generate: GenerateConfig = GenerateConfig()
    needle: NeedleConfig = NeedleConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1234

    @model_validator(mode="after")
    def _check(self):
        tp = self.parallel.tensor_parallel_size
        for name in ("num_attention_heads", "num_query_groups"):
            if getattr(self.model, name) % tp:
                raise ValueError(
                    f"model.{name}={getattr(self.model, name)} is not divisible by "
                    f"parallel.tensor_parallel_size={tp}: choose a tensor-parallel size that divides it"
                )
        schedule = self.apbv.passing_schedule
        if schedule is not None and len(schedule) != self.model.num_layers:
            raise ValueError(
                f"apbv.passing_schedule has {len(schedule)} entries but model.num_layers={self.model.num_layers}: "
                "give one budget per layer"
            )
        if self.input.kind == "video":
            unit = self.vision.patch_size * self.vision.spatial_merge_size
            if any(side % unit for side in self.input.frame_size) or min(self.input.frame_size) < unit:
                raise ValueError(
                    f"input.frame_size={list(self.input.frame_size)} must be multiples of vision.patch_size x "
                    f"vision.spatial_merge_size = {unit}"
                )
            if self.input.batch_size != 1:
                raise ValueError("input.batch_size must be 1 with input.kind=video")
        prompt = self.prompt_len
        anchor = resolve_budget(self.apbv.anchor, prompt, "anchor")
        if anchor + self.input.query_tokens > prompt:
            raise ValueError(
                f"apbv.anchor={self.apbv.anchor!r} ({anchor} tokens) + input.query_tokens="
                f"{self.input.query_tokens} exceeds the prompt of {prompt} tokens: shorten them or "
                "lengthen the input"
            )
        return self

    # Resolved quantities -------------------------------------------------------------

    @property
    def prompt_len(self) -> int:
        return self.input.system_tokens + self.input.video_tokens(self.vision) + self.input.query_tokens

    @property
    def anchor_len(self) -> int:
        return resolve_budget(self.apbv.anchor, self.prompt_len, "anchor")

    @property
    def query_len(self) -> int:
        return self.input.query_tokens

    def passing_lens(self, prompt_len: Optional[int] = None) -> tuple[int, ...]:
        """Per-layer passing budgets in tokens for a prompt of ``prompt_len`` (default: this config's prompt).

        ``all`` passes every key (the prompt length).
        """
        prompt = self.prompt_len if prompt_len is None else prompt_len
        schedule = self.apbv.passing_schedule or [self.apbv.setting("passing")] * self.model.num_layers
        # A budget beyond the prompt passes every key, exactly like "all": clamp so the counts stay real.
        return tuple(min(resolve_budget(b, prompt, "passing"), prompt) for b in schedule)

    def check_world_size(self, world_size: int) -> int:
        """The data-parallel size of a world of ``world_size`` ranks = DP x CP x TP (called before any collective).

        Raises unless CP x TP divides the world and, when ``parallel.data_parallel_size`` is set, the
        world is exactly that many replicas.
        """
        cp, tp = self.parallel.context_parallel_size, self.parallel.tensor_parallel_size
        replica = cp * tp
        dp = self.parallel.data_parallel_size
        if dp is None and world_size % replica == 0:
            return world_size // replica
        if dp is not None and world_size == dp * replica:
            return dp
        shape = f"parallel.context_parallel_size={cp} x parallel.tensor_parallel_size={tp} = {replica}"
        if dp is None:
            raise ConfigError(
                f"launched with {world_size} ranks but {shape} does not divide it: launch a multiple of "
                f"{replica} ranks or set parallel.context_parallel_size={world_size // tp or 1}"
            )
        raise ConfigError(
            f"launched with {world_size} ranks but parallel.data_parallel_size={dp} x {shape} = {dp * replica}: "
            f"launch {dp * replica} ranks or leave parallel.data_parallel_size unset"
        )


def _roundup(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def resolve_budget(budget, prompt_len: int, kind: str) -> int:
    """Token count of an anchor or passing budget for a prompt of ``prompt_len`` tokens.

    ``auto`` follows the paper's code (anchor ``roundup(N/64, 128)`` capped at the
    prompt, passing ``roundup(N/128, 128)``); ``all`` passes every key.
    """
    if budget == "auto":
        return min(_roundup(prompt_len / 64, 128), prompt_len) if kind == "anchor" else _roundup(prompt_len / 128, 128)
    if budget == "all":
        return prompt_len
    if isinstance(budget, bool):  # pragma: no cover - pydantic rejects it earlier
        raise ConfigError(f"{kind} budget must be a number, got {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise ConfigError(f"apbv.{kind}={budget} must be >= 0")
        return budget
    return int(math.ceil(budget * prompt_len))
