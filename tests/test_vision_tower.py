"""Our vision tower equals transformers' Qwen2.5-VL tower (same weights, fp32 on CPU within 1e-4).

The reference is ``transformers``' own ``Qwen2_5_VisionTransformerPretrainedModel``
(its per-segment attention, its window index, its rotary tables); weights are
random and large enough that every part of the tower moves the output, and are
moved between the two towers through the state dict (transformers' names).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_apbv.models.checkpoint import load_vision_weights  # noqa: E402
from megatron_apbv.models.hf_config import CheckpointError  # noqa: E402
from megatron_apbv.models.vision import encode_groups, patchify_for  # noqa: E402
from megatron_apbv.models.vision_attention import build_transformers_tower  # noqa: E402
from megatron_apbv.models.vision_tower import (  # noqa: E402
    MLP_PAD,
    VisionTower,
    VisionTowerConfig,
    build_vision_tower,
    vision_tower_flops,
)

SMALL = dict(hidden_size=32, num_heads=2, out_hidden_size=24)


def randomised_reference(seed: int = 1, **config):
    """transformers' tower with every parameter random (biases and norm weights too)."""
    ref = build_transformers_tower(dict(**SMALL, **config), seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    return ref


def ours_from(ref) -> VisionTower:
    ours = VisionTower(VisionTowerConfig.from_any(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


def outputs(tower, patches, grid):
    with torch.no_grad():
        out = tower(patches, grid_thw=torch.tensor(grid))
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def random_patches(grid, seed=0, k=3 * 2 * 14 * 14):
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


# (config, grid): odd window cuts, several temporal groups in one item, several items of different sizes,
# windows larger than the grid, every block full or none, intermediate sizes off the padding multiple.
CASES = [
    (dict(depth=3, intermediate_size=50, window_size=56, fullatt_block_indexes=[1]), [[2, 10, 14]]),
    (dict(depth=3, intermediate_size=64, window_size=56, fullatt_block_indexes=[0, 2]), [[1, 8, 8], [3, 6, 10]]),
    (dict(depth=2, intermediate_size=70, window_size=84, fullatt_block_indexes=[]), [[3, 14, 22]]),
    (dict(depth=2, intermediate_size=40, window_size=112, fullatt_block_indexes=[0, 1]), [[2, 12, 18]]),
    (dict(depth=4, intermediate_size=33, window_size=28, fullatt_block_indexes=[3]), [[1, 2, 2], [2, 6, 4]]),
    (dict(depth=2, intermediate_size=64, window_size=280, fullatt_block_indexes=[1]), [[2, 6, 8]]),
]


@pytest.mark.parametrize("config,grid", CASES)
def test_equals_transformers_tower(config, grid):
    ref = randomised_reference(**config)
    ours = ours_from(ref)
    patches = random_patches(grid)
    expected = outputs(ref, patches, grid)
    got = outputs(ours, patches, grid)
    assert got.shape == expected.shape == (patches.shape[0] // 4, SMALL["out_hidden_size"])
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().mean() > 1.0  # not a degenerate tower


def test_every_part_matters():
    """A changed weight in the windowed block, the full block or the merger changes the output (no dead code)."""
    config, grid = CASES[0]
    ref = randomised_reference(**config)
    patches = random_patches(grid)
    base = outputs(ours_from(ref), patches, grid)
    for name in ("blocks.0.mlp.down_proj.weight", "blocks.1.attn.qkv.bias", "blocks.2.norm1.weight",
                 "merger.ln_q.weight", "patch_embed.proj.weight"):
        state = ref.state_dict()
        state[name] = state[name] * 1.1
        ours = VisionTower(VisionTowerConfig.from_any(ref.config))
        ours.load_state_dict(state)
        assert (outputs(ours, patches, grid) - base).abs().max() > 1e-3, name


def test_state_dict_is_transformers_and_round_trips():
    ref = randomised_reference(depth=2, intermediate_size=50, window_size=56, fullatt_block_indexes=[1])
    ours = ours_from(ref)
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        assert mine[name].shape == t.shape and torch.equal(mine[name], t), name
    mlp = ours.blocks[0].mlp
    assert mlp.padded == MLP_PAD and mlp.gate_up_weight.shape == (2 * MLP_PAD, 32)
    pad = torch.cat([mlp.gate_up_weight[50:MLP_PAD].flatten(), mlp.gate_up_weight[MLP_PAD + 50:].flatten(),
                     mlp.gate_up_bias[50:MLP_PAD], mlp.gate_up_bias[MLP_PAD + 50:], mlp.down_weight[:, 50:].flatten()])
    assert pad.abs().max() == 0  # the padding stays zero
    # ours -> a fresh transformers tower: the same outputs as the original
    back = build_transformers_tower(dict(**SMALL, depth=2, intermediate_size=50, window_size=56,
                                         fullatt_block_indexes=[1]), seed=5)
    back.load_state_dict(mine, strict=True)
    grid = [[2, 8, 12]]
    patches = random_patches(grid, seed=3)
    torch.testing.assert_close(outputs(back, patches, grid), outputs(ref, patches, grid), rtol=0, atol=0)
    # state_dict() tensors are views: copying into them writes the tower (what load_vision_weights does)
    with torch.no_grad():
        ours.state_dict()["blocks.1.mlp.up_proj.bias"].fill_(0.5)
    assert (ours.blocks[1].mlp.gate_up_bias[MLP_PAD : MLP_PAD + 50] == 0.5).all()


def test_load_errors_name_the_tensor():
    ref = randomised_reference(depth=1, intermediate_size=50, fullatt_block_indexes=[0])
    ours = VisionTower(VisionTowerConfig.from_any(ref.config))
    state = ref.state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.0.mlp.gate_proj.bias"}
    with pytest.raises(RuntimeError, match="blocks.0.mlp.gate_proj.bias"):
        ours.load_state_dict(missing)
    bad = dict(state, **{"blocks.0.mlp.down_proj.weight": torch.zeros(32, 51)})
    with pytest.raises(RuntimeError, match=r"blocks.0.mlp.down_proj.weight.*\(32, 51\)"):
        ours.load_state_dict(bad)
    extra = dict(state, **{"blocks.0.mlp.fc3.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="blocks.0.mlp.fc3.weight"):
        ours.load_state_dict(extra)


def test_tiny_real_checkpoint(tmp_path):
    """visual.* of a saved Qwen2.5-VL checkpoint -> our tower: transformers' model.visual outputs on real frames."""
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=60, out_hidden_size=32,
                           window_size=56, fullatt_block_indexes=[1]),
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases and ones the norms: randomise them so they are tested
        for name, p in hf.model.visual.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.05))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = build_vision_tower(hf.config.vision_config, seed=9)
    assert load_vision_weights(ours, tmp_path) == len(hf.model.visual.state_dict())
    frames = torch.randint(0, 256, (5, 140, 196, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    patches, grid = patchify_for(ours.config, frames)
    got = encode_groups(ours, patches, grid, grid.groups)
    ref = encode_groups(hf.model.visual, patches, grid, grid.groups)
    assert (got - ref).abs().max().item() <= 1e-4
    # a checkpoint of another shape is refused, naming the tensor
    other = build_vision_tower(dict(hf.config.vision_config.to_dict(), intermediate_size=62), seed=0)
    shape = r"visual.blocks.\d.mlp.\w+_proj.weight: expected shape \((62, 32|32, 62)\), found"
    with pytest.raises(CheckpointError, match=shape):
        load_vision_weights(other, tmp_path)


def test_plan_is_cached_per_shape_and_inputs_are_checked():
    tower = build_vision_tower(dict(**SMALL, depth=1, intermediate_size=64, window_size=56, fullatt_block_indexes=[0]))
    grid = torch.tensor([[2, 8, 12]])
    first = tower.plan(grid, torch.device("cpu"))
    assert tower.plan(grid.clone(), torch.device("cpu")) is first
    assert tower.plan(torch.tensor([[1, 8, 12]]), torch.device("cpu")) is not first
    assert first.full.lengths == (96, 96) and first.windows.lengths == (16,) * 12  # 2 x 3 windows of 2 x 2 units
    with pytest.raises(ValueError, match="expected \\[192, 1176\\]"):
        tower(torch.zeros(190, 1176), grid)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        tower(torch.zeros(2 * 7 * 12, 1176), torch.tensor([[2, 7, 12]]))
    with pytest.raises(ValueError, match="hidden_act"):
        VisionTowerConfig(hidden_act="gelu")
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        VisionTowerConfig(depth=2, fullatt_block_indexes=(2,))


def _brute_force_flops(cfg: VisionTowerConfig, grid) -> float:
    """Independent count: windows found by assigning every merge unit to its window, one loop per unit."""
    c, i, out = cfg.hidden_size, cfg.intermediate_size, cfg.out_hidden_size
    m, vw = cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    k = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    total = 0.0
    for t, h, w in grid:
        n = t * h * w
        windows: dict = {}
        for br in range(h // m):
            for bc in range(w // m):
                windows[(br // vw, bc // vw)] = windows.get((br // vw, bc // vw), 0) + m * m
        for blk in range(cfg.depth):
            total += 2 * n * (c * 3 * c + c * c + 2 * c * i + i * c)
            if blk in cfg.fullatt_block_indexes:
                total += t * 4 * c * (h * w) ** 2
            else:
                total += t * sum(4 * c * s * s for s in windows.values())
        total += 2 * n * k * c + 2 * (n // (m * m)) * (4 * c * 4 * c + 4 * c * out)
    return total


def test_flops_formula():
    cfg = VisionTowerConfig()  # Qwen2.5-VL-7B
    grid = [[1, 102, 182]] * 32  # 64 frames of 1428 x 2548
    assert vision_tower_flops(cfg, grid) == _brute_force_flops(cfg, grid)
    assert 9.9e14 < vision_tower_flops(cfg, grid) < 1.0e15  # the "about 1.0 PFLOP"
    small = VisionTowerConfig(**SMALL, depth=3, intermediate_size=50, window_size=56, fullatt_block_indexes=(1,))
    for g in ([[2, 10, 14]], [[1, 8, 8], [3, 6, 10]]):
        assert vision_tower_flops(small, g) == _brute_force_flops(small, g)
    # transformers' config object gives the same count as ours
    ref = build_transformers_tower(dict(**SMALL, depth=3, intermediate_size=50, window_size=56,
                                        fullatt_block_indexes=[1]))
    assert vision_tower_flops(ref.config, [[2, 10, 14]]) == vision_tower_flops(small, [[2, 10, 14]])
    # the run config's vision section (no output width of its own) with the model's hidden size
    from megatron_apbv.runtime.config import VisionConfig

    section = VisionConfig(depth=3, hidden_size=32, num_heads=2, intermediate_size=50, window_size=56,
                           fullatt_block_indexes=[1])
    assert vision_tower_flops(section, [[2, 10, 14]], out_hidden_size=24) == vision_tower_flops(small, [[2, 10, 14]])


def test_gpu_bf16_matches_transformers():
    """bf16 on a CUDA GPU (Triton elementwise kernels, flash varlen windows, cuDNN full attention)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ref = build_transformers_tower(dict(depth=4, hidden_size=160, num_heads=2, intermediate_size=100,
                                        out_hidden_size=24, window_size=112, fullatt_block_indexes=[1, 3]),
                                   seed=3, device="cuda", dtype=torch.bfloat16)
    ours = VisionTower(VisionTowerConfig.from_any(ref.config)).to(device="cuda", dtype=torch.bfloat16)
    ours.load_state_dict(ref.state_dict())
    frames = torch.randint(0, 256, (4, 252, 364, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    patches, grid = patchify_for(ours.config, frames)
    expected = encode_groups(ref, patches, grid, grid.groups).float()
    got = encode_groups(ours, patches, grid, grid.groups).float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2
