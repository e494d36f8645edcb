"""The fused decode-step operations (issue 28): torch definitions and Triton kernels against float64, and the
fused layers against Megatron's own layers.

``add_rms_norm_`` and ``qkv_rope_append`` are checked against an independent float64
computation written out per row and per head; their kernels (``kernels/decode_step.py``)
run the same checks under ``TRITON_INTERPRET=1`` in a subprocess (fp32 and fp16: the
interpreter's bf16 is not trusted), at head dims 64 and 80 (a padded half) and GQA 1 / 7.
Then one decode runner with :class:`FusedDecodeLayers` (torch ops, CPU) gives the logits of
the runner through Megatron's ``TransformerLayer`` (multimodal RoPE, QKV bias, a batch of
two sequences at different lengths and positions).
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from interpreted_kernels import IN_INTERPRETER, load_interpreted_kernels, rerun_under_interpreter

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (batch, kv heads, group, head dim, with bias)
QKV_CASES = [(2, 2, 1, 64, True), (3, 1, 7, 80, False)]


def ref_add_rms_norm(residual, delta, weight, eps):
    r = residual.double() + (delta.double() if delta is not None else 0.0)
    rows = r.reshape(-1, r.shape[-1])
    out = torch.stack([row / math.sqrt(float((row * row).mean()) + eps) for row in rows]) * weight.double()
    return r, out.view(r.shape)


def ref_qkv_rope_append(qkv, bias, cos, sin, lengths, kv_heads, d):
    """float64 per head: (q [1, b, hq, d], {(pos, b, kv): (k, v)})."""
    b = qkv.shape[0]
    x = qkv.double() + (bias.double() if bias is not None else 0.0)
    x = x.view(b, kv_heads, -1, d)
    g = x.shape[2] - 2
    half = d // 2

    def rot(vec, bi):
        out = torch.empty(d, dtype=torch.float64)
        for i in range(half):
            c, s = float(cos[bi, i]), float(sin[bi, i])
            out[i] = vec[i] * c - vec[i + half] * s
            out[i + half] = vec[i + half] * c + vec[i] * s
        return out

    q = torch.empty(1, b, kv_heads * g, d, dtype=torch.float64)
    kv = {}
    for bi in range(b):
        for h in range(kv_heads):
            for j in range(g):
                q[0, bi, h * g + j] = rot(x[bi, h, j], bi)
            kv[(int(lengths[bi]), bi, h)] = (rot(x[bi, h, g], bi), x[bi, h, g + 1])
    return q, kv


def _qkv_inputs(case, dtype):
    b, hkv, g, d, with_bias = case
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(b, hkv * (g + 2) * d, generator=gen).to(dtype)
    bias = torch.randn(hkv * (g + 2) * d, generator=gen).to(dtype) if with_bias else None
    angles = torch.rand(b, d // 2, generator=gen, dtype=torch.float64) * 50
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    cap = 9
    k_cache = torch.full((cap, b, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full((cap, b, hkv, d), float("nan"), dtype=dtype)
    lengths = torch.tensor([(3 * i + 2) % cap for i in range(b)], dtype=torch.int32)
    return qkv, bias, cos, sin, k_cache, v_cache, lengths


def _check_qkv(fn, case, dtype):
    qkv, bias, cos, sin, k_cache, v_cache, lengths = _qkv_inputs(case, dtype)
    b, hkv, g, d, _ = case
    q = fn(qkv, bias, cos, sin, k_cache, v_cache, lengths, kv_heads=hkv)
    ref_q, ref_kv = ref_qkv_rope_append(qkv, bias, cos, sin, lengths, hkv, d)
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    assert q.dtype == dtype and q.shape == ref_q.shape
    torch.testing.assert_close(q.double(), ref_q, atol=tol, rtol=tol)
    written = ~torch.isnan(k_cache[..., 0])
    assert int(written.sum()) == len(ref_kv)  # nothing else in the cache was touched
    for (pos, bi, h), (k, v) in ref_kv.items():
        torch.testing.assert_close(k_cache[pos, bi, h].double(), k, atol=tol, rtol=tol)
        torch.testing.assert_close(v_cache[pos, bi, h].double(), v, atol=tol, rtol=tol)


def _check_norm(fn, dtype, with_delta):
    gen = torch.Generator().manual_seed(3)
    residual = torch.randn(1, 3, 96, generator=gen).to(dtype) * 3
    delta = torch.randn(1, 3, 96, generator=gen).to(dtype) if with_delta else None
    weight = torch.randn(96, generator=gen).to(dtype)
    ref_r, ref_out = ref_add_rms_norm(residual, delta, weight, 1e-6)
    out = fn(residual, delta, weight, 1e-6)
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(residual.double(), ref_r, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


@pytest.mark.skipif(IN_INTERPRETER, reason="torch path: checked in the outer run")
@pytest.mark.parametrize("case", QKV_CASES)
def test_torch_qkv_rope_append_matches_float64(case):
    from megatron_apbv.inference.decode_layer import qkv_rope_append

    _check_qkv(qkv_rope_append, case, torch.float32)


@pytest.mark.skipif(IN_INTERPRETER, reason="torch path: checked in the outer run")
@pytest.mark.parametrize("with_delta", [True, False])
def test_torch_add_rms_norm_matches_float64(with_delta):
    from megatron_apbv.inference.decode_layer import add_rms_norm_

    _check_norm(add_rms_norm_, torch.float32, with_delta)


def test_decode_step_kernels_under_interpreter():
    """Outer entry: the kernel tests of this module in a subprocess with TRITON_INTERPRET=1."""
    proc = rerun_under_interpreter(__file__, "-k", "kernel_")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"{2 * len(QKV_CASES) + 4} passed" in proc.stdout, proc.stdout[-2000:]


def _interpreted():
    return load_interpreted_kernels("_apbv_decode_step_kernels_interpreted")


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs inside the TRITON_INTERPRET=1 subprocess")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", QKV_CASES)
def test_kernel_qkv_rope_append_matches_float64(case, dtype):
    _check_qkv(_interpreted().decode_qkv_rope_append, case, dtype)


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs inside the TRITON_INTERPRET=1 subprocess")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_delta", [True, False])
def test_kernel_add_rms_norm_matches_float64(dtype, with_delta):
    _check_norm(_interpreted().decode_add_rms_norm, dtype, with_delta)


def _fused_vs_megatron(rank, world):
    from megatron_apbv.apbv.decode import DecodeCache
    from megatron_apbv.inference.decode_step import DecodeRunner
    from megatron_apbv.models.gpt import build_gpt_model, build_rope
    from megatron_apbv.runtime.distributed import LaunchEnv, init_distributed, shutdown
    from megatron_apbv.models.resolve import load_config

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        "parallel.context_parallel_size=1", "model.init_std=0.3", "model.mrope_section=[2,3,3]"])
    device = torch.device("cpu")
    init_distributed(cfg, LaunchEnv(0, 1, 0), device)
    try:
        model = build_gpt_model(cfg, method="apbv", device=device)
        rope = build_rope(cfg, device)
        m = cfg.model
        gen = torch.Generator().manual_seed(5)
        lengths = torch.tensor([11, 6], dtype=torch.int32)
        shape = (16, 2, m.num_query_groups, m.head_dim)
        base = {n: (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
                for n in range(1, m.num_layers + 1)}
        positions = torch.tensor([[11, 6], [20, 9], [17, 30]])
        tokens = torch.tensor([3, 200])
        logits = {}
        with torch.inference_mode():
            for fused in (False, True):
                layers = {n: (k.clone(), v.clone()) for n, (k, v) in base.items()}
                cache = DecodeCache(layers, lengths.clone(), torch.ones_like(lengths), world_size=1)
                runner = DecodeRunner(model, rope, cache, positions, cuda_graph=False, fused=fused)
                out = []
                for _ in range(3):
                    runner.feed(tokens if not out else runner.greedy)
                    runner.step()
                    out.append(runner.logits.clone())
                logits[runner.layers_path] = (torch.stack(out), {n: kv[0][:14].clone() for n, kv in layers.items()})
        return logits
    finally:
        shutdown()


@pytest.mark.skipif(IN_INTERPRETER, reason="model run: outer run only")
def test_fused_decode_layers_equal_megatron_layers():
    from distributed_utils import run_on_ranks

    result = run_on_ranks(1, _fused_vs_megatron)
    (ref, ref_keys), (fused, fused_keys) = result["megatron"], result["fused"]
    assert ref.shape == (3, 2, 256) and ref.std() > 0.1
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
    for n in ref_keys:  # the appended (rotated) keys of the three steps, as Megatron's layer wrote them
        torch.testing.assert_close(fused_keys[n], ref_keys[n], atol=1e-5, rtol=1e-5)
