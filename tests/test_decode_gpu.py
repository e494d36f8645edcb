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


@pytest.fixture(scope="module")
def single_rank():
    from distributed_utils import free_port

    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.runtime.loading import load_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    init_distributed(load_config(CONFIG, GPU), LaunchEnv(0, 1, 0), torch.device("cuda"))
    yield
    shutdown()


def _prefills(frames: list[int], new_tokens: int):
    from megatron_apbv.inference.engine import Engine
    from megatron_apbv.inference.prefill import apbv_prefill
    from megatron_apbv.runtime.loading import load_config

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


def test_batched_decode_equals_one_sequence_at_a_time(single_rank):
    cfg, runs = _prefills([12, 7, 3], 16)
    batched = _generate(cfg, runs, True)
    singles = [_generate(cfg, [r], True).generated_ids[0] for r in runs]
    assert batched.generated_ids == singles
    assert len({tuple(s) for s in singles}) == 3


def test_generate_reports_the_mode_and_build_times(single_rank):
    from megatron_apbv.inference.generate import apbv_generate
    from megatron_apbv.runtime.loading import load_config

    record = apbv_generate(load_config(CONFIG, GPU + ["generate.max_new_tokens=8", "input.batch_size=2"]),
                           torch.device("cuda"))
    assert record["decode_mode"] == "cuda_graph"
    assert record["build_seconds"] >= 0 and record["load_seconds"] >= 0
    assert [len(r) for r in record["generated_ids"]] == [8, 8]
