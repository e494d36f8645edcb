"""Synthetic long-video needle task: seeded videos of structured noise with scene cards and a needle.

A video has ``F`` frames of smooth structured noise (:func:`structured_noise`).
It is cut into *scenes* by 2-5 **scene cards**: whole frames of horizontal stripes in
one colour of the palette (distinct colours within a video). Exactly one frame holds
the **needle**: a 2 x 2-patch square with a checkerboard of a palette colour and black,
at a random place, somewhere after the first card. Some other frames hold a
**distractor**: a solid square of a palette colour (no checkerboard).

Two questions are asked about a video:

``colour``  "What colour was the needle?" - a single-hop lookup: the answer is written in
            the needle's own pixels, so the query tokens (which APB-V attends exactly)
            can read it directly.
``scene``   "Which scene card was showing when the needle appeared?" - the colour of the
            latest card *before* the needle. The needle frame does not show it: it must
            be integrated from an earlier, possibly far-away, frame. The natural
            solution is context-to-context: the needle's tokens look back to the most
            recent card (causal attention makes "most recent" easy), and the query reads
            the needle. This is what Star attention (each block sees only the anchor and
            itself) breaks when that card lies in another block, and what APB-V's
            passing blocks can carry.

Every example comes from its own seed. The train and held-out splits take seeds from
disjoint ranges (:data:`SPLITS`); :func:`example_seed` asserts it.

Token ids (vocabulary of at least :data:`MIN_VOCAB` ids)::

    [system: BOS + words] [video placeholders: F * tokens_per_frame] [query: VIDEO_END, question words..., ASSISTANT]

and the answer is the next token after the query: one of the colour ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from megatron_apbv.runtime.config import ConfigError, RunConfig

# --------------------------------------------------------------------------- vocabulary

PAD, BOS = 0, 1
SYSTEM_WORDS = list(range(2, 18))  # a fixed "system prompt"
VIDEO = 20  # video placeholder (replaced by the vision front end's embeddings)
VIDEO_END = 21
QUESTION_WORDS = {
    "colour": [22, 24, 25, 26, 27],  # "what colour was the needle ?"
    "scene": [23, 30, 31, 32, 33, 34, 27],  # "which scene card was showing when the needle appeared ?"
}
ASSISTANT = 29
COLOUR_BASE = 40  # answer ids COLOUR_BASE + c
NONE = 50  # "no scene yet" (auxiliary state target before the first card)
MIN_VOCAB = 64
QUESTION_TYPES = ("colour", "scene")

PALETTE = (
    ("red", (1.0, 0.0, 0.0)),
    ("green", (0.0, 1.0, 0.0)),
    ("blue", (0.0, 0.0, 1.0)),
    ("yellow", (1.0, 1.0, 0.0)),
    ("magenta", (1.0, 0.0, 1.0)),
    ("cyan", (0.0, 1.0, 1.0)),
    ("white", (1.0, 1.0, 1.0)),
    ("orange", (1.0, 0.5, 0.0)),
)
COLOUR_NAMES = tuple(name for name, _ in PALETTE)
QUESTION_TEXT = {
    "colour": "What colour was the needle?",
    "scene": "Which scene card was showing when the needle appeared?",
}

# Seed ranges of the splits: [start, stop). Disjoint by construction; asserted in example_seed.
SPLIT_SIZE = 1_000_000_000
SPLITS = {"train": (0, SPLIT_SIZE), "heldout": (SPLIT_SIZE, 2 * SPLIT_SIZE)}


def colour_token(c: int) -> int:
    return COLOUR_BASE + int(c)


def answer_name(token: int) -> str:
    c = int(token) - COLOUR_BASE
    return COLOUR_NAMES[c] if 0 <= c < len(COLOUR_NAMES) else f"<token {int(token)}>"


def example_seed(split: str, index: int) -> int:
    """Seed of example ``index`` of ``split``; the ranges of the splits never overlap."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLITS)}")
    start, stop = SPLITS[split]
    seed = start + int(index)
    if not (start <= seed < stop):
        raise ValueError(f"{split} example {index} is outside its seed range [{start}, {stop})")
    other = [s for name, s in SPLITS.items() if name != split]
    assert all(not (lo <= seed < hi) for lo, hi in other), "train and held-out seeds must never overlap"
    return seed


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class NeedleGeometry:
    """Lengths of a needle prompt, derived from the config."""

    frames: int
    frame_size: tuple[int, int]
    patch: int
    system_tokens: int
    query_tokens: int
    cards: tuple[int, int]
    distractor_rate: float

    @property
    def grid(self) -> tuple[int, int]:
        return self.frame_size[0] // self.patch, self.frame_size[1] // self.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def video_start(self) -> int:
        return self.system_tokens

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def prompt_len(self) -> int:
        return self.system_tokens + self.video_tokens + self.query_tokens

    def frame_span(self, frame: int) -> tuple[int, int]:
        """Global token span ``[start, stop)`` of a frame."""
        start = self.video_start + frame * self.tokens_per_frame
        return start, start + self.tokens_per_frame

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "NeedleGeometry":
        n, inp = cfg.needle, cfg.input
        h, w = n.frame_size
        if h % n.patch_size or w % n.patch_size or min(h, w) < 2 * n.patch_size:
            raise ConfigError(
                f"needle.frame_size={list(n.frame_size)} must be multiples of needle.patch_size={n.patch_size} "
                "and at least 2 patches on each side"
            )
        geo = cls(inp.video_frames, (h, w), n.patch_size, inp.system_tokens, inp.query_tokens,
                  tuple(n.cards), n.distractor_rate)
        if inp.kind != "needle":
            raise ConfigError(f"input.kind={inp.kind!r}: the needle benchmark needs input.kind=needle")
        if inp.tokens_per_frame != geo.tokens_per_frame:
            raise ConfigError(
                f"input.tokens_per_frame={inp.tokens_per_frame} but needle.frame_size / needle.patch_size give "
                f"{geo.grid[0]} x {geo.grid[1]} = {geo.tokens_per_frame} patches per frame: set "
                f"input.tokens_per_frame={geo.tokens_per_frame}"
            )
        if inp.system_tokens < 1 or inp.system_tokens > 1 + len(SYSTEM_WORDS):
            raise ConfigError(f"input.system_tokens must be in [1, {1 + len(SYSTEM_WORDS)}] for the needle task")
        longest = max(len(w) for w in QUESTION_WORDS.values()) + 2
        if inp.query_tokens < longest:
            raise ConfigError(f"input.query_tokens={inp.query_tokens}: the needle questions need at least {longest}")
        lo, hi = n.cards
        if not 1 <= lo <= hi <= len(PALETTE) or hi >= inp.video_frames - 1:
            raise ConfigError(f"needle.cards={list(n.cards)}: need 1 <= min <= max <= {len(PALETTE)} and < frames - 1")
        if cfg.model.vocab_size < MIN_VOCAB:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: the needle task needs at least {MIN_VOCAB}")
        return geo


# --------------------------------------------------------------------------- examples


@dataclass
class NeedleExample:
    seed: int
    question: str  # "colour" or "scene"
    frames: torch.Tensor  # uint8 [F, H, W, 3]
    input_ids: torch.Tensor  # [N] long
    answer: int  # token id
    needle_frame: int
    needle_cell: tuple[int, int]  # top-left patch (row, col) of the 2 x 2-patch needle
    needle_colour: int
    card_frames: list[int]
    card_colours: list[int]
    scene_card: int  # frame of the card showing when the needle appeared
    state: torch.Tensor = field(repr=False)  # [N] long: scene state of every token (auxiliary target)
    # [3, N] long, classes 0 = none, 1 + c = colour c: per-token probe targets (training only):
    # the current scene, the needle's colour once the needle was seen, the scene the needle appeared in.
    targets: torch.Tensor = field(repr=False, default=None)


def _stripes(colour: torch.Tensor, h: int, w: int) -> torch.Tensor:
    rows = (torch.arange(h) % 2 == 0).to(torch.float32)[:, None, None]  # colour on even rows, black on odd
    return rows * colour[None, None, :] * torch.ones(h, w, 3)


def _checker(colour: torch.Tensor, size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    on = ((yy + xx) % 2 == 0).to(torch.float32)[..., None]
    return on * colour[None, None, :]


def structured_noise(frames: int, h: int, w: int, gen: torch.Generator, keyframe_every: int = 8) -> torch.Tensor:
    """Smooth random colour fields drifting between random keyframes, ``float32 [F, H, W, 3]`` in [0, 0.8].

    The same kind of structured noise as :func:`megatron_apbv.models.video.synthetic_video`
    (coarse control points upsampled in space and interpolated in time), in float32
    and without the moving wave, so that examples are cheap to draw while training.
    """
    keys = torch.rand(frames // keyframe_every + 2, 3, 3, 4, generator=gen)
    t = torch.arange(frames, dtype=torch.float32) / keyframe_every
    lo = t.floor().long()
    frac = (t - lo)[:, None, None, None]
    coarse = keys[lo] * (1 - frac) + keys[lo + 1] * frac  # [F, 3, 3, 4]
    field_ = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return (0.8 * field_).permute(0, 2, 3, 1).contiguous()


def make_example(geo: NeedleGeometry, split: str, index: int, question: str | None = None) -> NeedleExample:
    """Example ``index`` of ``split`` (deterministic: the same call gives the same example)."""
    seed = example_seed(split, index)
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:  # [lo, hi)
        return int(torch.randint(lo, hi, (1,), generator=gen))

    F_, (H, W), p = geo.frames, geo.frame_size, geo.patch
    gh, gw = geo.grid
    if question is None:
        question = QUESTION_TYPES[randint(0, len(QUESTION_TYPES))]
    if question not in QUESTION_TYPES:
        raise ValueError(f"question={question!r}: expected one of {QUESTION_TYPES}")

    # Scene cards: distinct frames, distinct colours; the first one leaves room for a needle after it.
    n_cards = randint(geo.cards[0], geo.cards[1] + 1)
    while True:
        card_frames = sorted(torch.randperm(F_, generator=gen)[:n_cards].tolist())
        candidates = [f for f in range(card_frames[0] + 1, F_) if f not in card_frames]
        if candidates:
            break
    card_colours = torch.randperm(len(PALETTE), generator=gen)[:n_cards].tolist()
    needle_frame = candidates[randint(0, len(candidates))]
    scene_idx = max(i for i, f in enumerate(card_frames) if f < needle_frame)
    scene_card, scene_colour = card_frames[scene_idx], card_colours[scene_idx]
    needle_colour = [c for c in range(len(PALETTE)) if c != scene_colour][randint(0, len(PALETTE) - 1)]
    cell = (randint(0, gh - 1), randint(0, gw - 1))

    # Pixels: structured noise, cards, needle, distractors.
    video = structured_noise(F_, H, W, gen)
    palette = torch.tensor([rgb for _, rgb in PALETTE], dtype=torch.float32)
    for f, c in zip(card_frames, card_colours):
        video[f] = _stripes(palette[c], H, W)
    y, x = cell[0] * p, cell[1] * p
    video[needle_frame, y : y + 2 * p, x : x + 2 * p] = _checker(palette[needle_colour], 2 * p)
    flips = (torch.rand(F_, generator=gen) < geo.distractor_rate).tolist()
    dc = torch.randint(0, len(PALETTE), (F_,), generator=gen).tolist()
    dy = torch.randint(0, gh - 1, (F_,), generator=gen).tolist()
    dx = torch.randint(0, gw - 1, (F_,), generator=gen).tolist()
    specials = set(card_frames) | {needle_frame}
    for f in range(F_):
        if flips[f] and f not in specials:
            video[f, dy[f] * p : dy[f] * p + 2 * p, dx[f] * p : dx[f] * p + 2 * p] = palette[dc[f]]
    frames = (video * 255 + 0.5).clamp_(0, 255).to(torch.uint8)

    ids = prompt_ids(geo, question)
    # Scene state of every token: NONE before the first card, then the colour of the latest card.
    state = torch.full((geo.prompt_len,), NONE, dtype=torch.long)
    for f, c in zip(card_frames, card_colours):
        state[geo.frame_span(f)[0] :] = colour_token(c)
    answer = colour_token(needle_colour if question == "colour" else scene_colour)
    targets = torch.zeros(3, geo.prompt_len, dtype=torch.long)
    for f, c in zip(card_frames, card_colours):
        targets[0, geo.frame_span(f)[0] :] = 1 + c
    first_needle_token = geo.frame_span(needle_frame)[0] + cell[0] * gw + cell[1]
    targets[1, first_needle_token:] = 1 + needle_colour
    targets[2, first_needle_token:] = 1 + scene_colour
    return NeedleExample(
        seed=seed, question=question, frames=frames, input_ids=ids, answer=answer,
        needle_frame=needle_frame, needle_cell=cell, needle_colour=needle_colour,
        card_frames=card_frames, card_colours=card_colours, scene_card=scene_card, state=state,
        targets=targets,
    )


def prompt_ids(geo: NeedleGeometry, question: str) -> torch.Tensor:
    system = ([BOS] + SYSTEM_WORDS)[: geo.system_tokens]
    words = [VIDEO_END] + QUESTION_WORDS[question]
    pad = geo.query_tokens - len(words) - 1
    query = words + [PAD] * pad + [ASSISTANT]
    return torch.tensor(system + [VIDEO] * geo.video_tokens + query, dtype=torch.long)


def heldout_set(geo: NeedleGeometry, count: int) -> list[NeedleExample]:
    """The first ``count`` held-out examples, question types alternating (balanced)."""
    return [make_example(geo, "heldout", i, QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(count)]


def needle_token_span(geo: NeedleGeometry, ex: NeedleExample) -> list[int]:
    """Global indices of the needle's 4 tokens."""
    start = geo.frame_span(ex.needle_frame)[0]
    gw = geo.grid[1]
    r, c = ex.needle_cell
    return [start + (r + dy) * gw + (c + dx) for dy in (0, 1) for dx in (0, 1)]


def evidence_is_local(geo: NeedleGeometry, ex: NeedleExample, block_spans: Sequence, anchor_len: int) -> bool:
    """True when a Star-attention block could see the scene card from the needle.

    Star's block holding the needle sees the anchor and its own block only: the
    ``scene`` question is *local* when some token of the scene card lies in the anchor
    or in the virtual block of the needle's first token, and *cross-block* otherwise.
    """
    needle = needle_token_span(geo, ex)[0]
    block = next((s for s in block_spans if s.start <= needle < s.stop), None)
    lo, hi = geo.frame_span(ex.scene_card)
    if lo < anchor_len:
        return True
    return block is not None and lo < block.stop and hi > block.start


def collate(examples: Sequence[NeedleExample]) -> dict[str, torch.Tensor]:
    return {
        "frames": torch.stack([e.frames for e in examples]),
        "input_ids": torch.stack([e.input_ids for e in examples]),
        "answer": torch.tensor([e.answer for e in examples], dtype=torch.long),
        "state": torch.stack([e.state for e in examples]),
        "targets": torch.stack([e.targets for e in examples]),
    }
