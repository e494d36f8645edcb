"""On a GPU: the decode-attention kernel against float64, and graphed / batched decoding against eager / single.

Skipped without CUDA. One process, an NCCL group of one (W = 1), bf16.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
GPU = ["device=cuda", "dtype=bfloat16", "parallel.context_parallel_size=1", "model.init_std=0.3",
       "model.num_attention_heads=8", "model.num_query_groups=2", "model.hidden_size=256", "apbv.variant=exact"]


def reference(q, k, v, lengths, tail):
    """float64 on the GPU: token j of sequence b sees keys < len_b - tail_b * (t - 1 - j)."""
    t, b, hq, d = q.shape
    g = hq // k.shape[2]
    out = torch.zeros(t, b, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.full((b, hq, t), -math.inf, dtype=torch.float64, device=q.device)
    for bi in range(b):
        for j in range(t):
            n = lengths[bi] - tail[bi] * (t - 1 - j)
            if n <= 0:
                continue
            kk = k[:n, bi].double().repeat_interleave(g, dim=1)  # [n, hq, d]
            vv = v[:n, bi].double().repeat_interleave(g, dim=1)
            s = torch.einsum("hd,nhd->hn", q[j, bi].double(), kk) / math.sqrt(d)
            lse[bi, :, j] = torch.logsumexp(s, -1)
            out[j, bi] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vv)
    return out, lse


@pytest.mark.parametrize("t, hq, hkv, lengths, tail", [
    (1, 28, 4, [32771], [1]),  # the 7B shape (GQA 7), odd length, many splits
    (1, 4, 4, [1, 4097, 999], [1, 1, 0]),  # GQA 1, batch with different lengths
    (3, 16, 4, [70001, 130], [1, 1]),  # GQA 4, three new tokens, causal
    (2, 7, 1, [0, 513], [0, 1]),  # an empty row
])
def test_decode_kernel_matches_float64(t, hq, hkv, lengths, tail):
    from megatron_apbv.apbv.decode import decode_attention
    from megatron_apbv.apbv.kernels_dispatch import kernel_for

    g = torch.Generator(device="cuda").manual_seed(sum(lengths))
    b, d, cap = len(lengths), 128, max(lengths) + 7
    q = torch.randn(t, b, hq, d, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(cap, b, hkv, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    k[max(lengths):], v[max(lengths):] = float("nan"), float("nan")
    assert kernel_for("decode_attention", q) is not None
    dev = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    out, lse = decode_attention(q, k, v, dev(lengths), dev(tail), softmax_scale=d ** -0.5)
    ref_out, ref_lse = reference(q, k, v, lengths, tail)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("combine", ["in_kernel", "kernel"])
@pytest.mark.parametrize("d, hq, hkv, lengths", [
    (64, 16, 2, [32771, 5]),  # Qwen2.5-VL-3B's GQA 8 at head dim 64
    (80, 28, 4, [4099]),  # a padded head dim, the 7B group
    (96, 64, 8, [1, 20000]),  # the 72B group (GQA 8) at head dim 96
])
def test_decode_kernel_combines_and_head_dims(combine, d, hq, hkv, lengths):
    from megatron_apbv.kernels.decode_attention import decode_attention

    g = torch.Generator(device="cuda").manual_seed(d)
    b, cap = len(lengths), max(lengths) + 3
    q = torch.randn(1, b, hq, d, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(cap, b, hkv, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    k[max(lengths):], v[max(lengths):] = float("nan"), float("nan")
    dev = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    counters = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
    ref_out, ref_lse = reference(q, k, v, lengths, [1] * b)
    for _ in range(3):  # the counters are reset by each call
        out, lse = decode_attention(q, k, v, dev(lengths), dev([1] * b), softmax_scale=d ** -0.5, combine=combine,
                                    counters=counters)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)
    assert not counters.any()


@pytest.mark.parametrize("b, hkv, g, d, bias", [(1, 4, 7, 128, True), (8, 2, 8, 128, True), (3, 8, 8, 80, False)])
def test_fused_step_kernels_match_torch(b, hkv, g, d, bias):
    """The CUDA kernels of the fused decode step against their torch definitions (run on the CPU in fp32)."""
    from megatron_apbv.inference import decode_layer as dl

    gen = torch.Generator(device="cuda").manual_seed(b * d)
    hidden = hkv * g * d
    res = torch.randn(1, b, hidden, device="cuda", generator=gen).bfloat16()
    delta = torch.randn(1, b, hidden, device="cuda", generator=gen).bfloat16()
    w = torch.randn(hidden, device="cuda", generator=gen).bfloat16()
    res_cpu = res.float().cpu()
    out = dl.add_rms_norm_(res, delta, w, 1e-6)
    ref = dl.add_rms_norm_(res_cpu, delta.float().cpu(), w.float().cpu(), 1e-6)
    torch.testing.assert_close(res.float().cpu(), res_cpu, atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(out.float().cpu(), ref, atol=5e-2, rtol=2e-2)

    qkv = torch.randn(b, hkv * (g + 2) * d, device="cuda", generator=gen).bfloat16()
    bvec = torch.randn(hkv * (g + 2) * d, device="cuda", generator=gen).bfloat16() if bias else None
    ang = torch.rand(b, d // 2, device="cuda", generator=gen, dtype=torch.float64) * 1e5
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    lengths = torch.arange(b, dtype=torch.int32, device="cuda") * 3 + 1
    caches = [torch.zeros(3 * b + 2, b, hkv, d, device="cuda").bfloat16() for _ in range(2)]
    cpu_caches = [c.float().cpu() for c in caches]
    q = dl.qkv_rope_append(qkv, bvec, cos, sin, *caches, lengths, kv_heads=hkv)
    ref_q = dl.qkv_rope_append(qkv.float().cpu(), bvec.float().cpu() if bias else None, cos.cpu(), sin.cpu(),
                               *cpu_caches, lengths.cpu(), kv_heads=hkv)
    torch.testing.assert_close(q.float().cpu(), ref_q, atol=5e-2, rtol=2e-2)
    for c, r in zip(caches, cpu_caches):
        torch.testing.assert_close(c.float().cpu(), r, atol=5e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def single_rank():
    from distributed_utils import free_port

    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    init_distributed(load_config(CONFIG, GPU), LaunchEnv(0, 1, 0), torch.device("cuda"))
    yield
    shutdown()


def _prefills(frames: list[int], new_tokens: int):
    from megatron_apbv.inference.engine import Engine
    from megatron_apbv.inference.prefill import apbv_prefill
    from megatron_apbv.models.resolve import load_config

    runs, first = [], None
    for n in frames:
        cfg = load_config(CONFIG, GPU + [f"input.video_frames={n}", f"generate.max_new_tokens={new_tokens}"])
        engine = Engine.of(first) if first else None
        first = apbv_prefill(cfg, torch.device("cuda"), max_new_tokens=new_tokens, engine=engine)
        runs.append(first)
    return cfg, runs


def _generate(cfg, runs, graphs):
    from megatron_apbv.inference.generate import generate_batch

    return generate_batch(runs, cfg.generate, seed=cfg.seed, stop_ids=[], cuda_graphs=graphs)


def test_graphed_decode_equals_eager(single_rank):
    cfg, runs = _prefills([12], 24)
    graphed, eager = _generate(cfg, runs, True), _generate(cfg, runs, False)
    assert (graphed.decode_mode, eager.decode_mode) == ("cuda_graph", "eager")
    assert graphed.generated_ids == eager.generated_ids
    assert len(set(graphed.generated_ids[0])) > 3


def test_fused_layers_equal_megatron_layers_on_the_gpu(single_rank):
    """Steps through FusedDecodeLayers (the Triton kernels) and through Megatron's layers, fed the same tokens
    over copies of one cache (multimodal RoPE, QKV bias, 2 sequences): the same logits within bf16 rounding."""
    from megatron_apbv.apbv.decode import DecodeCache
    from megatron_apbv.inference.decode_step import DecodeRunner
    from megatron_apbv.models.gpt import build_gpt_model, build_rope
    from megatron_apbv.models.resolve import load_config

    cfg = load_config(CONFIG, GPU + ["model.mrope_section=[4,6,6]"])
    device = torch.device("cuda")
    model = build_gpt_model(cfg, method="apbv", device=device)
    rope = build_rope(cfg, device)
    m = cfg.model
    g = torch.Generator(device="cuda").manual_seed(11)
    shape = (600, 2, m.num_query_groups, m.head_dim)
    base = {n: tuple(torch.randn(shape, device="cuda", generator=g).bfloat16() for _ in range(2))
            for n in range(1, m.num_layers + 1)}
    lengths = torch.tensor([500, 77], dtype=torch.int32, device="cuda")
    positions = torch.tensor([[500, 77], [530, 90], [510, 120]], device="cuda")
    tokens = torch.tensor([[5, 17], [100, 3], [42, 250], [7, 7]], device="cuda")
    logits = {}
    with torch.inference_mode():
        for fused in (True, False):
            cache = DecodeCache({n: (k.clone(), v.clone()) for n, (k, v) in base.items()}, lengths.clone(),
                                torch.ones_like(lengths), world_size=1)
            runner = DecodeRunner(model, rope, cache, positions, cuda_graph=False, fused=fused)
            steps = []
            for t in tokens:
                runner.feed(t)
                runner.step()
                steps.append(runner.logits.clone())
            logits[runner.layers_path] = torch.stack(steps)
    ref, fused = logits["megatron"], logits["fused"]
    assert ref.std() > 0.1
    torch.testing.assert_close(fused, ref, atol=0.05 * float(ref.abs().max()), rtol=0.05)
    assert (fused.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_batched_decode_equals_one_sequence_at_a_time(single_rank):
    cfg, runs = _prefills([12, 7, 3], 16)
    batched = _generate(cfg, runs, True)
    singles = [_generate(cfg, [r], True).generated_ids[0] for r in runs]
    assert batched.generated_ids == singles
    assert len({tuple(s) for s in singles}) == 3


def test_generate_reports_the_mode_and_build_times(single_rank):
    from megatron_apbv.inference.generate import apbv_generate
    from megatron_apbv.models.resolve import load_config

    record = apbv_generate(load_config(CONFIG, GPU + ["generate.max_new_tokens=8", "input.batch_size=2"]),
                           torch.device("cuda"))
    assert record["decode_mode"] == "cuda_graph"
    assert record["build_seconds"] >= 0 and record["load_seconds"] >= 0
    assert [len(r) for r in record["generated_ids"]] == [8, 8]


def _cp_generation(rank, world, graphs):
    from megatron_apbv.inference.generate import apbv_generate
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    torch.cuda.set_device(rank)
    overrides = [o for o in GPU if not o.startswith("parallel.")] + [
        f"parallel.context_parallel_size={world}", "generate.max_new_tokens=16", f"generate.cuda_graphs={graphs}"]
    cfg = load_config(CONFIG, overrides)
    device = torch.device("cuda", rank)
    init_distributed(cfg, LaunchEnv(rank, world, rank), device)
    try:
        record = apbv_generate(cfg, device)
        return record["generated_ids"], record["decode_mode"]
    finally:
        shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (CP decode over NCCL)")
def test_cp_decode_graph_with_its_collective_equals_eager():
    """W = 2 over NCCL: the step (both ranks' attention, the all-gather + LSE merge of every layer) is one
    captured graph per rank, and it decodes the same tokens as the eager step."""
    from distributed_utils import run_on_ranks

    graphed = run_on_ranks(2, _cp_generation, "true")
    eager = run_on_ranks(2, _cp_generation, "false")
    assert (graphed[1], eager[1]) == ("cuda_graph", "eager")
    assert graphed[0] == eager[0]
    assert len(set(graphed[0][0])) > 3
