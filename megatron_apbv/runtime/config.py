"""YAML run configuration: model shape, APB-V settings, parallelism, input, dtype.

Configs are validated pydantic models (pydantic already comes with DeepSpeed).
Every check that can fail runs before any process group is touched, on every
rank, with a message naming the field, the value and what is allowed: a wrong
config can never leave some ranks waiting in a collective.

(Over 400 lines on purpose: it is the one schema of the YAML file, one small pydantic class per
section plus the cross-section checks; splitting it would spread one file's keys over several.)
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    confloat,
    field_validator,
    model_validator,
)

# The variants and the settings each fixes are the method registry's (docs/design.md §7).
from megatron_apbv.methods import APBV_DEFAULTS, VARIANTS

VariantName = Literal[tuple(VARIANTS)]  # apbv.variant's choices: the registry's APB-V variants

# Every section validates strictly (_Section): a boolean is no number (``apbv.window=true`` is an error,
# not window 1), a float no integer; floats still take integers (``rope_theta: 10000``).
Ratio = confloat(gt=0.0, le=1.0)
Count = Annotated[int, Field(ge=0)]
# YAML has no tuples: a pair is a list of two integers (strict per item, lax only list -> tuple).
IntPair = Annotated[tuple[StrictInt, StrictInt], Field(strict=False)]
PositiveIntPair = Annotated[tuple[Annotated[StrictInt, Field(ge=1)], Annotated[StrictInt, Field(ge=1)]],
                            Field(strict=False)]
# Seeds feed torch generators (64-bit) after arithmetic (seed + 1, seed * 1_000_003 + index): 32 bits keep
# every derived seed in range, so a request's seed can never overflow mid-job.
MAX_SEED = 2**32 - 1
# Below this a temperature (or above its inverse a repetition penalty) divides float32 logits past float64's
# range (inf / nan probabilities); such a temperature is greedy in effect: use 0.
MIN_SAMPLING_SCALE = 1e-4

# timedelta -> milliseconds in the backends' C++ (gloo, NCCL, the TCP store): beyond 2**31 ms they wrap
# or overflow (9e9 s hangs a gloo run), so the longest accepted timeout is the last whole second below it.
MAX_TIMEOUT_SECONDS = (2**31 - 1) // 1000


class BudgetRule(BaseModel):
    """A budget that scales with the prompt's layout (issue 34): exactly one of

    * ``paper: k``: ``k`` times the paper's rule (anchor ``roundup(N/64, 128)``, passing ``roundup(N/128, 128)``);
    * ``block: f``: a fraction ``f`` of the longest virtual block, ``ceil(f * ceil((N - a - q) / blocks))``
      (passing only: the block is what the anchor leaves, so it cannot size the anchor).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    paper: Optional[Annotated[float, Field(gt=0.0, le=64.0)]] = None
    block: Optional[Ratio] = None

    @model_validator(mode="after")
    def _check(self):
        if (self.paper is None) == (self.block is None):
            raise ValueError("set exactly one of paper and block")
        return self


def _as_budget_rule(value, where: str):
    """A mapping given as a budget becomes a :class:`BudgetRule`, or one error naming ``where`` and the forms."""
    if not isinstance(value, dict):
        return value
    try:
        return BudgetRule(**value)
    except ValidationError as err:
        problems = "; ".join(
            (".".join(map(str, e["loc"])) + ": " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in err.errors())
        raise ValueError(f"{where}={value!r}: {problems}. A budget rule is {{paper: k}} (k times the paper's "
                         "rule, 0 < k <= 64) or {block: f} (a fraction 0 < f <= 1 of the block)") from None


# A budget is a token count (int), a fraction of the prompt length (float in (0, 1]), a BudgetRule or a name:
# `paper` is the paper's rule, `auto` the shipped default below, `all` (passing) every key.
AnchorBudget = Union[Count, Ratio, Literal["auto", "paper"], BudgetRule]
PassingBudget = Union[Count, Ratio, Literal["auto", "paper", "all"], BudgetRule]
# What `auto` resolves to: the shipped default budgets, chosen from the real-model accuracy-cost sweep by
# megatron_apbv/eval/budget_choice.py (README "Budgets"). Switching the default is this one line.
AUTO_BUDGETS = {"anchor": "paper", "passing": "paper"}


def without_variant_settings(apbv: dict, variant: str) -> dict:
    """``apbv`` settings minus those ``variant`` fixes: a newly chosen variant replaces them (command line, bench)."""
    fixed = set(VARIANTS[variant]) | ({"passing_schedule"} if "passing" in VARIANTS[variant] else set())
    return {k: v for k, v in apbv.items() if k not in fixed}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(_Section):
    """Qwen2/Llama-style decoder: RMSNorm, SwiGLU, GQA, RoPE."""

    num_layers: int = Field(2, ge=1, le=100_000, description="decoder layers")  # bounded: one passing budget is resolved per layer
    hidden_size: int = Field(64, ge=1, description="model width")
    num_attention_heads: int = Field(4, ge=1, description="query heads")
    num_query_groups: int = Field(2, ge=1, description="KV heads (GQA groups)")
    kv_channels: Optional[int] = Field(None, ge=1, description="head dim; default hidden_size / heads")
    ffn_hidden_size: int = Field(128, ge=1, description="SwiGLU inner width")
    vocab_size: int = Field(256, ge=2, description="token ids 0 .. vocab_size-1")
    rope_theta: float = Field(1_000_000.0, gt=0, allow_inf_nan=False, description="RoPE base")
    mrope_section: Optional[list[int]] = Field(None, description="Qwen2.5-VL 3-D RoPE sections (t, h, w)")
    norm_epsilon: float = Field(1e-6, gt=0, allow_inf_nan=False, description="RMSNorm epsilon")
    qkv_bias: StrictBool = Field(True, description="bias on the Q, K, V projections (Qwen2: true)")
    tie_embeddings: StrictBool = Field(False, description="output layer shares the input embedding")
    max_position_embeddings: int = Field(1 << 20, ge=1, description="longest position the model accepts")
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

    variant: VariantName = Field(
        "apbv", description="apbv; apb_like (no zigzag, no overlap); star (passing 0); exact (passing all = dense)"
    )
    anchor: AnchorBudget = Field(
        "auto", description="tokens, fraction of N, paper = roundup(N/64, 128), {paper: k} = k x paper, "
        "auto = the shipped default (AUTO_BUDGETS)")
    passing: Optional[PassingBudget] = Field(
        None, description="keys per KV head per block: tokens, fraction of N, paper = roundup(N/128, 128), "
        "{paper: k} = k x paper, {block: f} = a fraction f of the block, auto = the shipped default, all")
    passing_schedule: Optional[list[PassingBudget]] = Field(
        None, description="per-layer passing budgets (each any form of apbv.passing)")
    window: int = Field(5, ge=1, description="max-pool smoothing window of the scores (odd)")
    selection: Literal["mean", "softmax", "max", "recent", "frame"] = Field(
        "mean",
        description="which keys a block passes (same count for every rule): mean = the paper's mean query score; "
        "max = max over query tokens; softmax = the attention the query tokens would give each key in its block; "
        "recent = a recent_fraction share for the block's last keys, the rest by mean; frame = whole frames "
        "(input.tokens_per_frame tokens after the system tokens) ranked by their best key",
    )
    recent_fraction: float = Field(0.25, ge=0.0, le=1.0, description="selection=recent: share of p for the last keys")
    zigzag: Optional[StrictBool] = Field(None, description="zigzag load balancing (null: as the variant sets it)")
    overlap: Optional[StrictBool] = Field(
        None, description="overlap the exchange with compute (null: as the variant sets it)"
    )

    @field_validator("anchor", "passing", mode="before")
    @classmethod
    def _budget_rules(cls, value, info):
        return _as_budget_rule(value, f"apbv.{info.field_name}")

    @field_validator("passing_schedule", mode="before")
    @classmethod
    def _schedule_rules(cls, value):
        if isinstance(value, list):
            return [_as_budget_rule(v, f"apbv.passing_schedule[{i}]") for i, v in enumerate(value)]
        return value

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
        if isinstance(self.anchor, BudgetRule) and self.anchor.block is not None:
            raise ValueError("apbv.anchor={block: ...}: the block is what the anchor leaves of the prompt, so it "
                             "cannot size the anchor: give tokens, a fraction of the prompt, paper or {paper: k}")
        if self.passing_schedule is not None and "passing" in VARIANTS[self.variant]:
            raise ValueError(f"apbv.passing_schedule cannot be combined with apbv.variant={self.variant!r}")
        return self

    def setting(self, key: str):
        """``zigzag`` / ``overlap`` / ``passing`` after the variant and the defaults are applied."""
        value = getattr(self, key)
        if value is None:
            value = VARIANTS[self.variant].get(key, APBV_DEFAULTS[key])
        return value


class ParallelConfig(_Section):
    context_parallel_size: int = Field(2, ge=1, description="size of the APB-V group")
    tensor_parallel_size: int = Field(1, ge=1, description="Megatron tensor parallelism inside each CP rank")
    data_parallel_size: Optional[int] = Field(
        None, ge=1,
        description="APB-V replicas serving different requests (apbv infer); null = world / (CP x TP)",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on GPUs, gloo on CPUs")
    timeout_seconds: int = Field(
        600, ge=1, description=f"timeout of every collective, at most {MAX_TIMEOUT_SECONDS} s (~24.8 days)"
    )

    @field_validator("timeout_seconds")
    @classmethod
    def _timeout_fits_the_backends(cls, value: int) -> int:
        if value > MAX_TIMEOUT_SECONDS:
            raise ValueError(
                f"{value} s is above {MAX_TIMEOUT_SECONDS} s, the longest timeout the process-group backends "
                "hold (milliseconds in a 32-bit counter): use a smaller value"
            )
        return value


class VisionConfig(_Section):
    """Qwen2.5-VL vision tower (``input.kind: video``); its output width is ``model.hidden_size``."""

    depth: int = Field(2, ge=1, description="vision transformer blocks")
    hidden_size: int = Field(64, ge=1, description="vision width")
    num_heads: int = Field(4, ge=1, description="vision attention heads")
    intermediate_size: int = Field(128, ge=1, description="vision MLP inner width")
    patch_size: int = Field(14, ge=1, description="pixels per patch side")
    spatial_merge_size: int = Field(2, ge=1, description="patches merged per side into one token")
    temporal_patch_size: int = Field(2, ge=1, description="frames per temporal group")
    window_size: int = Field(112, ge=1, description="window attention side in pixels")
    fullatt_block_indexes: list[int] = Field(
        default_factory=lambda: [1], description="blocks with full (not windowed) attention"
    )
    tokens_per_second: float = Field(4.0, gt=0, allow_inf_nan=False, description="temporal RoPE steps per second")

    def tokens_per_group(self, frame_size: tuple[int, int]) -> int:
        """Video tokens of one temporal group (``temporal_patch_size`` frames)."""
        unit = self.patch_size * self.spatial_merge_size
        return (frame_size[0] // unit) * (frame_size[1] // unit)


class VideoSource(_Section):
    """What ``input.video_path``'s container holds; ``load_config`` reads it from the file (not a user key)."""

    total_frames: int = Field(ge=1, strict=True, description="decodable frames")
    fps: float = Field(gt=0, allow_inf_nan=False, description="the stream's average frame rate")
    height: int = Field(ge=1, strict=True)
    width: int = Field(ge=1, strict=True)


class InputConfig(_Section):
    """The prompt ``[system | video | question]``; the question (+ assistant header) is the query span.

    ``kind: synthetic`` uses random token ids for everything (``tokens_per_frame``
    ids per frame); ``kind: video`` encodes frames (``video_path``, or a seeded
    synthetic video when null) with the vision tower over the APB-V group. A file's
    frames are sampled and resized by Qwen2.5-VL's rules (runtime/video_sampling.py).
    """

    kind: Literal["synthetic", "video", "needle", "text"] = Field(
        "synthetic", description="synthetic: random ids; video: frames through the vision tower; needle: apbv eval; "
        "text: a long document (input.context or input.context_path) before input.question"
    )
    system_tokens: int = Field(
        16, ge=0, description="random ids before the video (set by the text with input.question)"
    )
    video_frames: Optional[int] = Field(
        None, ge=0, description="explicit frame count (wins over input.fps); null: sampled at input.fps "
        "from input.video_path, else 8"
    )
    tokens_per_frame: int = Field(32, ge=1, description="synthetic kind only")
    video_path: Optional[str] = Field(None, description="video kind: a file PyAV can decode; null = synthetic video")
    fps: float = Field(2.0, gt=0, allow_inf_nan=False, description="video file: frames sampled per second")
    min_frames: int = Field(4, ge=1, description="video file, sampling by fps: at least this many frames")
    max_frames: int = Field(768, ge=1, description="video file, sampling by fps: at most this many frames")
    frame_size: Optional[PositiveIntPair] = Field(
        None, description="explicit (H, W) frames are resized to; null: smart_resize of the file's size "
        "within min/max/total_pixels, else (56, 56)"
    )
    min_pixels: int = Field(128 * 28 * 28, ge=1, description="video file: fewest pixels per frame")
    max_pixels: int = Field(768 * 28 * 28, ge=1, description="video file: most pixels per frame")
    total_pixels: int = Field(
        int(128000 * 28 * 28 * 0.9), ge=1,
        description="video file: pixel budget of the whole video (caps max_pixels per frame)",
    )
    seconds_per_frame: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False,
        description="explicit time between sampled frames for the temporal RoPE step (null: from the "
        "sampled fps of input.video_path, else one step per temporal group)",
    )
    source: Optional[VideoSource] = Field(None, description="read from input.video_path by the loader")
    query_tokens: int = Field(
        16, ge=1, description="question + assistant header: the query span Q (set by the text with input.question)"
    )
    batch_size: int = Field(1, ge=1, description="prompts per batch (1 with kind=video)")
    # Real text instead of random ids: rendered by model.tokenizer's chat template, which then sets
    # system_tokens and query_tokens (megatron_apbv/models/chat_prompt.py).
    system_prompt: Optional[str] = Field(None, description="system turn text (with input.question)")
    question: Optional[str] = Field(None, min_length=1, description="the user's question after the video")
    # kind: text. The document is the context span split across the ranks (models/chat_prompt.py).
    context: Optional[str] = Field(None, min_length=1, description="text kind: the document, inline")
    context_path: Optional[str] = Field(None, min_length=1, description="text kind: a UTF-8 file holding the document")
    context_tokens: Optional[int] = Field(
        None, ge=1, description="text kind: the document's token count (set by the loader from the text)"
    )

    @model_validator(mode="after")
    def _check_video(self):
        if self.min_frames > self.max_frames:
            raise ValueError(f"input.min_frames={self.min_frames} exceeds input.max_frames={self.max_frames}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"input.min_pixels={self.min_pixels} exceeds input.max_pixels={self.max_pixels}")
        if self.source is not None and self.video_path is None:
            raise ValueError("input.source describes input.video_path, which is not set: remove input.source")
        if self.system_prompt is not None and self.question is None:
            raise ValueError(
                "input.system_prompt is set but input.question is not: the system turn is rendered only with a "
                "question; set input.question too (or remove input.system_prompt)"
            )
        given = [name for name in ("context", "context_path") if getattr(self, name) is not None]
        if self.kind != "text" and given:
            raise ValueError(f"input.{given[0]} is the document of input.kind=text: set input.kind=text or remove it")
        if self.kind == "text":
            if len(given) != 1:
                raise ValueError("input.kind=text needs exactly one of input.context (the text) and "
                                 f"input.context_path (a file){'; both are set' if given else ''}")
            if self.question is None:
                raise ValueError("input.kind=text needs input.question: the question after the document is "
                                 "the query span")
            if self.context_tokens is None:
                raise ValueError("input.context_tokens is unset: load the config with load_config, which "
                                 "tokenizes the document")
        return self

    def video_tokens(self, vision: VisionConfig) -> int:
        """Tokens of the span between the system and query spans (the video's, or the document's)."""
        if self.kind == "text":
            return self.context_tokens
        if self.kind != "video":  # synthetic and needle: tokens_per_frame tokens per frame
            return self.frame_count * self.tokens_per_frame
        plan = self.frame_plan(vision)
        return plan.groups * vision.tokens_per_group(plan.size)

    @property
    def frame_count(self) -> int:
        """Frames of the synthetic and needle kinds: ``video_frames``, else 8."""
        from megatron_apbv.runtime.video_sampling import SYNTHETIC_FRAMES

        return SYNTHETIC_FRAMES if self.video_frames is None else self.video_frames

    def frame_plan(self, vision: VisionConfig):
        """The sampled frames of the video kind (:func:`megatron_apbv.runtime.video_sampling.frame_plan`)."""
        from megatron_apbv.runtime.video_sampling import frame_plan

        return frame_plan(self, vision)


class NeedleConfig(_Section):
    """Video-needle benchmark (``input.kind: needle``, ``apbv eval``); see megatron_apbv/eval/needle.py."""

    frame_size: IntPair = Field((16, 24), description="frame (H, W) in pixels")
    patch_size: int = Field(4, ge=1, description="patch side; tokens_per_frame = (H/patch) * (W/patch)")
    cards: IntPair = Field((2, 5), description="min, max scene cards per video")
    distractor_rate: float = Field(0.25, ge=0.0, le=1.0, description="fraction of frames with a distractor")
    checkpoint: Optional[str] = Field("checkpoints/needle/needle.safetensors", description="trained weights")
    eval_examples: int = Field(64, ge=1, description="held-out examples apbv eval scores")
    eval_batch: int = Field(8, ge=1, description="examples per forward in apbv eval")
    budgets: list[Ratio] = Field(default_factory=lambda: [1 / 256, 1 / 128, 1 / 64], description="passing budgets as fractions p / N of the prompt")
    demo_index: int = Field(0, ge=0, description="held-out example of apbv eval --demo")


class GenerateConfig(_Section):
    """Decoding after the prefill (``apbv generate``)."""

    max_new_tokens: int = Field(16, ge=1, description="tokens to decode")
    # null sampling keys: model.checkpoint's generation_config.json (set by load_config), else the neutral value
    temperature: Optional[float] = Field(
        None, ge=0.0, allow_inf_nan=False,
        description=f"0 = greedy, else at least {MIN_SAMPLING_SCALE:g}; null: generation_config.json's (0 unless "
        "it sets do_sample), else 0",
    )
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="nucleus mass; null: generation_config.json's, else 1")
    top_k: Optional[int] = Field(
        None, ge=0, strict=True, description="keep the k most likely ids (0 = off); null: generation_config.json's, else 0"
    )
    repetition_penalty: Optional[float] = Field(
        None, ge=MIN_SAMPLING_SCALE, le=1 / MIN_SAMPLING_SCALE, allow_inf_nan=False,
        description="HF repetition penalty on ids already in the sequence; null: generation_config.json's, else 1",
    )
    stop_ids: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="token ids that end the generation (each below model.vocab_size)"
    )
    stop_at_eos: StrictBool = Field(
        True, description="also stop at model.checkpoint's end-of-sequence ids (generation_config.json, config.json)"
    )
    cuda_graphs: Union[Literal["auto"], StrictBool] = Field(
        "auto", description="replay each decode step from a CUDA graph: auto = on for CUDA, off on the CPU; "
        "true needs a CUDA device"
    )

    @field_validator("temperature")
    @classmethod
    def _temperature_is_greedy_or_usable(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and 0 < value < MIN_SAMPLING_SCALE:
            raise ValueError(
                f"{value!r} is below {MIN_SAMPLING_SCALE:g}: the logits divided by it overflow (inf / nan "
                "probabilities); use 0 for greedy decoding"
            )
        return value


class JobsConfig(_Section):
    """``apbv infer``: how each data-parallel replica keeps its GPU busy, and the limits that protect the whole
    job from one request (job-level: requests cannot set them; see megatron_apbv/jobs/)."""

    pipeline: Literal["pipelined", "serial"] = Field(
        "pipelined", description="pipelined: frames prefetched by CPU workers, continuous batched decoding; "
        "serial: one request after another, each stage in turn (apbv infer --pipeline overrides it)"
    )
    batch_size: int = Field(8, ge=1, le=4096, description="pipelined: sequences a replica decodes together (slots)")
    prefetch_depth: int = Field(
        4, ge=0, le=1024, description="pipelined: requests claimed ahead whose frames the workers decode meanwhile"
    )
    prefetch_workers: int = Field(
        2, ge=1, le=256, description="pipelined: CPU threads decoding and resizing the prefetched requests' frames"
    )
    max_new_tokens_limit: int = Field(
        4096, ge=1,
        description="a request asking for more generate.max_new_tokens gets an error record instead of running: "
        "keep the longest request within parallel.timeout_seconds (an idle replica waits that long at the end)",
    )
    progress_seconds: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="off a terminal, rank 0 prints one progress line (done/total, errors, req/s, tok/s, ETA) this often",
    )
    metrics_port: Optional[int] = Field(
        None, ge=0, le=65535, strict=True,
        description="rank 0 serves Prometheus metrics on this port (0: any free one; apbv infer --metrics-port "
        "overrides it); null: none (needs prometheus-client)",
    )


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    apbv: APBVConfig = APBVConfig()
    parallel: ParallelConfig = ParallelConfig()
    input: InputConfig = InputConfig()
    vision: VisionConfig = VisionConfig()
    generate: GenerateConfig = GenerateConfig()
    needle: NeedleConfig = NeedleConfig()
    jobs: JobsConfig = JobsConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and activations")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda:LOCAL_RANK when a GPU is visible")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="random weights, synthetic prompts and sampling")

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
            size = self.input.frame_size
            if size is not None and (any(side % unit for side in size) or min(size) < unit):
                raise ValueError(
                    f"input.frame_size={list(size)} must be multiples of vision.patch_size x "
                    f"vision.spatial_merge_size = {unit}"
                )
            if self.input.video_path is not None and self.input.source is None:
                raise ValueError(
                    "input.source is missing: load the config with load_config, which reads it from input.video_path"
                )
            self.input.frame_plan(self.vision)  # raises naming the input field (e.g. a video too short)
            if self.input.batch_size != 1:
                raise ValueError("input.batch_size must be 1 with input.kind=video")
        if self.device == "cpu" and self.generate.cuda_graphs is True:
            raise ValueError("generate.cuda_graphs=true needs device: cuda (CUDA graphs); set generate.cuda_graphs=auto")
        prompt = self.prompt_len
        if prompt > self.model.max_position_embeddings:
            raise ValueError(
                f"the prompt of {prompt} tokens (input.system_tokens + video + input.query_tokens) is longer than "
                f"model.max_position_embeddings={self.model.max_position_embeddings}: shorten the input"
            )
        beyond = [i for i in self.generate.stop_ids if i >= self.model.vocab_size]
        if beyond:
            raise ValueError(
                f"generate.stop_ids={self.generate.stop_ids}: {beyond} not below model.vocab_size="
                f"{self.model.vocab_size}: the model never emits them"
            )
        anchor = resolve_budget(self.apbv.anchor, prompt, "anchor", query_len=self.input.query_tokens)
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
        return resolve_budget(self.apbv.anchor, self.prompt_len, "anchor", query_len=self.query_len)

    def passing_budgets(self) -> list:
        """The per-layer passing budgets as configured (schedule, or ``apbv.passing`` after the variant)."""
        return list(self.apbv.passing_schedule or [self.apbv.setting("passing")] * self.model.num_layers)

    @property
    def query_len(self) -> int:
        return self.input.query_tokens

    def passing_lens(self, prompt_len: Optional[int] = None) -> tuple[int, ...]:
        """Per-layer passing budgets in tokens for a prompt of ``prompt_len`` (default: this config's prompt).

        ``all`` passes every key (the prompt length).
        """
        prompt = self.prompt_len if prompt_len is None else prompt_len
        return passing_lengths(self.passing_budgets(), prompt_len=prompt,
                               anchor_len=resolve_budget(self.apbv.anchor, prompt, "anchor",
                                                        query_len=self.query_len),
                               query_len=self.query_len, world_size=self.parallel.context_parallel_size,
                               zigzag=self.apbv.setting("zigzag"))

    def check_generation_fits(self) -> None:
        """Raise unless the prompt plus ``generate.max_new_tokens`` fits ``model.max_position_embeddings``.

        Checked by the commands that decode (not by the config: a prefill never uses the budget).
        """
        total = self.prompt_len + self.generate.max_new_tokens
        if total > self.model.max_position_embeddings:
            raise ConfigError(
                f"generate.max_new_tokens={self.generate.max_new_tokens} after the prompt of {self.prompt_len} "
                f"tokens reaches position {total}, beyond model.max_position_embeddings="
                f"{self.model.max_position_embeddings}: lower generate.max_new_tokens to at most "
                f"{max(self.model.max_position_embeddings - self.prompt_len, 0)}"
            )

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


def roundup(x: float, multiple: int) -> int:
    """``x`` rounded up to a multiple of ``multiple`` (the paper's budget rule)."""
    return int(math.ceil(x / multiple) * multiple)


def longest_block(prompt_len: int, anchor_len: int, query_len: int, world_size: int, zigzag: bool = True) -> int:
    """Length of the longest virtual block (``SequenceLayout``'s split of the context into 2W or W blocks)."""
    blocks = 2 * world_size if zigzag else world_size
    return -(-max(prompt_len - anchor_len - query_len, 0) // blocks)


def passing_lengths(budgets, *, prompt_len: int, anchor_len: int, query_len: int, world_size: int,
                    zigzag: bool = True) -> tuple[int, ...]:
    """Per-layer passing budgets in tokens: the one resolution the distributed code and the oracle share.

    A budget beyond the prompt passes every key, exactly like ``all``: clamped so the counts stay real.
    """
    block = longest_block(prompt_len, anchor_len, query_len, world_size, zigzag)
    return tuple(min(resolve_budget(b, prompt_len, "passing", block_len=block), prompt_len) for b in budgets)


def resolve_budget(budget, prompt_len: int, kind: str, *, block_len: Optional[int] = None, query_len: int = 0) -> int:
    """Token count of an anchor or passing budget for a prompt of ``prompt_len`` tokens.

    ``paper`` follows the paper's code (anchor ``roundup(N/64, 128)`` capped at the prompt, passing
    ``roundup(N/128, 128)``); ``auto`` is the shipped default (``AUTO_BUDGETS``); ``all`` passes every key;
    a :class:`BudgetRule` scales the paper's rule (``paper``) or the longest block ``block_len`` (``block``).
    An anchor given by a rule is capped at the context before the query (``prompt_len - query_len``), so that
    short requests of a job fit whatever their length (a prompt shorter than the rule's anchor is then all anchor:
    exact attention, tested equal to dense); an anchor given in tokens is taken as given (and refused
    by the config's check if it does not fit).
    """
    rule_cap = max(prompt_len - query_len, 0)  # the longest anchor a rule gives (the anchor never holds the query)
    if budget == "auto":
        budget = AUTO_BUDGETS[kind]
    if isinstance(budget, dict):
        budget = BudgetRule(**budget)
    if budget == "paper":
        return min(roundup(prompt_len / 64, 128), rule_cap) if kind == "anchor" else roundup(prompt_len / 128, 128)
    if isinstance(budget, BudgetRule):
        if budget.paper is not None:
            tokens = math.ceil(budget.paper * resolve_budget("paper", prompt_len, kind))
            return min(tokens, rule_cap) if kind == "anchor" else tokens
        if kind == "anchor" or block_len is None:
            raise ConfigError(f"apbv.{kind}={{block: {budget.block}}}: a fraction of the block sizes only a "
                              "passing budget (the block is known once the anchor is)")
        return math.ceil(budget.block * block_len)
    if budget == "all":
        return prompt_len
    if isinstance(budget, bool):  # pragma: no cover - pydantic rejects it earlier
        raise ConfigError(f"{kind} budget must be a number, got {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise ConfigError(f"apbv.{kind}={budget} must be >= 0")
        return budget
    return int(math.ceil(budget * prompt_len))
