"""The vision tower's Triton kernels (kernels/vision_elementwise.py) under the Triton interpreter, on CPU.

Each kernel must compute what the torch definition in
``megatron_apbv/models/vision_tower.py`` computes (fp32 and fp16; bf16 ``tl``
arithmetic is not trusted in the interpreter), on shapes that are not multiples
of the kernels' blocks and on the strided views the tower passes. The torch
definitions are themselves checked against transformers' tower in
test_vision_tower.py. Like test_kernels_cpu.py, the outer test re-runs this file
in a subprocess with ``TRITON_INTERPRET=1`` so that nothing leaks into other tests.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
_IN_INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreted():
    name = "_apbv_vision_kernels_interpreted"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(ROOT / "kernels")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.vision_elementwise")


def test_vision_kernels_under_interpreter():
    """Outer entry: run this module's tests in a subprocess with TRITON_INTERPRET=1."""
    if _IN_INTERP:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pathlib.Path(__file__))],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + "\n" + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


needs_interp = pytest.mark.skipif(not _IN_INTERP, reason="runs inside the TRITON_INTERPRET=1 subprocess")
DTYPES = [torch.float32, torch.float16]


def _close(got, want, dtype):
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(37, 96), (5, 1280), (1, 40)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_rms_norm(dtype, rows, cols, with_bias):
    from megatron_apbv.models.vision_tower import bias_rms_norm

    k = _interpreted()
    g = torch.Generator().manual_seed(rows + cols)
    h = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    bias = torch.randn(cols, generator=g).to(dtype) if with_bias else None
    weight = torch.randn(cols, generator=g).to(dtype)
    h_kernel, h_torch = h.clone(), h.clone()
    _close(k.vision_bias_rms_norm(h_kernel, bias, weight, 1e-6), bias_rms_norm(h_torch, bias, weight, 1e-6), dtype)
    _close(h_kernel, h_torch, dtype)  # the bias is added in place (or nothing changes)


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,d", [(23, 3, 20), (17, 16, 80), (1, 2, 8)])
def test_rope_qk_in_place(dtype, rows, heads, d):
    from megatron_apbv.models.vision_tower import rope_qk_

    k = _interpreted()
    g = torch.Generator().manual_seed(rows * heads)
    # the tower's qkv: the fused linear output viewed as [N, 3, heads, D] (rows of stride 3 * heads * D)
    qkv = torch.randn(rows, 3 * heads * d, generator=g).to(dtype).view(rows, 3, heads, d)
    angles = torch.randn(rows, d // 2, generator=g) * 10
    cos, sin = angles.cos(), angles.sin()
    ours, ref = qkv.clone(), qkv.clone()
    k.vision_rope_qk_(ours, cos, sin)
    rope_qk_(ref, cos, sin)
    _close(ours, ref, dtype)
    assert torch.equal(ours[:, 2], qkv[:, 2])  # v untouched


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inner", [(29, 200), (3, 3456), (40, 64)])
def test_silu_mul(dtype, rows, inner):
    from megatron_apbv.models.vision_tower import silu_mul

    k = _interpreted()
    gate_up = (torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(inner)) * 4).to(dtype)
    _close(k.vision_silu_mul(gate_up), silu_mul(gate_up), dtype)


@needs_interp
def test_kernels_reject_bad_layouts():
    k = _interpreted()
    with pytest.raises(ValueError, match="vision_rope_qk_"):
        k.vision_rope_qk_(torch.zeros(4, 3, 2, 8), torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="2 \\* I"):
        k.vision_silu_mul(torch.zeros(4, 7))
