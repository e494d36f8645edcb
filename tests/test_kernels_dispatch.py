"""No silent fallback: CPU tensors take torch, CUDA tensors a kernel or a clear error; the route table's choices."""

from __future__ import annotations

import pytest
import torch

from megatron_apbv.apbv import attention_routes, kernels_dispatch
from megatron_apbv.apbv.attend import apb_attention, apb_mask, masked_attention
from megatron_apbv.apbv.attention_routes import (
    CUDNN,
    TORCH,
    TRITON,
    TRITON_SPLIT_KEYS,
    route_for,
)
from megatron_apbv.apbv.kernels_dispatch import KernelUnavailable, kernel_for


class _FakeCudaTensor:
    """Only what kernel_for reads: a tensor that says it lives on CUDA."""

    is_cuda = True


@pytest.fixture
def missing_module(monkeypatch):
    """``missing_module(name)``: the kernel module fails to import because module ``name`` is missing
    (simulated for this test only; the kernel module's cache is cleared before and after)."""

    def simulate(missing):
        def fail(name, *args, **kwargs):
            raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)

        kernels_dispatch._load_kernel_module.cache_clear()
        monkeypatch.setattr(kernels_dispatch.importlib, "import_module", fail)
        monkeypatch.delenv(kernels_dispatch.DISABLE_ENV, raising=False)

    yield simulate
    kernels_dispatch._load_kernel_module.cache_clear()


@pytest.fixture
def no_kernels(missing_module):
    """The kernel module fails to import because Triton is missing."""
    missing_module("triton")


def test_cpu_tensors_take_the_torch_path(no_kernels):
    assert kernel_for("apb_attention", torch.zeros(1)) is None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 1, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(13, 1, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = apb_attention(q, k[:3], v[:3], k[3:7], v[3:7], k[7:], v[7:], anchor_rows=4, softmax_scale=0.3)
    ref_out, ref_lse = masked_attention(q, k, v, apb_mask(4, 5, 3, 4, 6), softmax_scale=0.3)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_cuda_tensors_without_kernels_raise_naming_the_fix(no_kernels):
    with pytest.raises(KernelUnavailable) as err:
        kernel_for("apb_attention", _FakeCudaTensor())
    message = str(err.value)
    assert "Triton is not installed: pip install triton" in message
    assert "APBV_DISABLE_KERNELS=1" in message


def test_missing_kernel_module_names_the_package(missing_module):
    missing_module("megatron_apbv.kernels")
    with pytest.raises(KernelUnavailable, match="reinstall the package"):
        kernel_for("merge_partials", _FakeCudaTensor())


def test_disable_switch_is_the_explicit_torch_path(no_kernels, monkeypatch):
    monkeypatch.setenv(kernels_dispatch.DISABLE_ENV, "1")
    assert kernel_for("apb_attention", _FakeCudaTensor()) is None


@pytest.fixture
def hopper_with_cudnn(monkeypatch):
    monkeypatch.setattr(attention_routes, "_generation", lambda device: 9)
    monkeypatch.setattr(attention_routes, "cudnn_op_available", lambda: True)
    monkeypatch.delenv(kernels_dispatch.DISABLE_ENV, raising=False)


CUDA = torch.device("cuda")


def test_routes_follow_the_measured_table(hopper_with_cudnn):
    bf16 = torch.bfloat16
    big = attention_routes.MEASURED[(9, 128)]["cudnn_from_rows"]
    # second block: square causal block + dense prefix, measured faster on cuDNN
    r = route_for(CUDA, bf16, 128, rows=big, anchor_rows=0, n_pass=3000, n_anchor=2000, n_block=big)
    assert (r.anchor_rows, r.block_rows) == (None, CUDNN)
    # first block: anchor rows stay on Triton
    r = route_for(CUDA, bf16, 128, rows=2048 + big, anchor_rows=2048, n_pass=0, n_anchor=2048, n_block=big)
    assert (r.anchor_rows, r.block_rows) == (TRITON, CUDNN)
    # below the measured crossover, not square (bottom-right causal), fp32, unmeasured head dim: Triton
    assert route_for(CUDA, bf16, 128, rows=big // 2, anchor_rows=0, n_pass=0, n_anchor=0,
                     n_block=big // 2).block_rows == TRITON
    assert route_for(CUDA, bf16, 128, rows=big, anchor_rows=0, n_pass=0, n_anchor=0,
                     n_block=big + 1).block_rows == TRITON
    assert route_for(CUDA, torch.float32, 128, rows=big, anchor_rows=0, n_pass=0, n_anchor=0,
                     n_block=big).block_rows == TRITON
    assert route_for(CUDA, bf16, 80, rows=big, anchor_rows=0, n_pass=0, n_anchor=0, n_block=big).block_rows == TRITON
    # few query rows over many keys: split keys
    assert route_for(CUDA, bf16, 128, rows=64, anchor_rows=0, n_pass=20000, n_anchor=0,
                     n_block=64).block_rows == TRITON_SPLIT_KEYS


def test_routes_without_cudnn_or_on_other_gpus_are_triton(monkeypatch):
    monkeypatch.delenv(kernels_dispatch.DISABLE_ENV, raising=False)
    monkeypatch.setattr(attention_routes, "cudnn_op_available", lambda: False)
    monkeypatch.setattr(attention_routes, "_generation", lambda device: 9)
    assert route_for(CUDA, torch.bfloat16, 128, rows=1 << 17, anchor_rows=0, n_pass=0, n_anchor=0,
                     n_block=1 << 17).block_rows == TRITON
    monkeypatch.setattr(attention_routes, "cudnn_op_available", lambda: True)
    monkeypatch.setattr(attention_routes, "_generation", lambda device: 8)
    assert route_for(CUDA, torch.bfloat16, 128, rows=1 << 17, anchor_rows=0, n_pass=0, n_anchor=0,
                     n_block=1 << 17).block_rows == TRITON


def test_describe_layer_reports_every_part():
    from megatron_apbv.apbv.layout import SequenceLayout

    layout = SequenceLayout(4096, 128, 64, 2, zigzag=True).rank(0)
    report = attention_routes.describe_layer(layout, 128, torch.bfloat16, torch.device("cpu"))
    assert report == {"block0": f"anchor rows: {TORCH}; block rows: {TORCH}", "block1": f"block rows: {TORCH}",
                      "query_partial": f"block rows: {TORCH}"}


def test_cudnn_route_assembles_the_apb_result(monkeypatch):
    """The cuDNN route's pieces (two partials, LSE merge, anchor rows into the first rows) give apb_attention.

    cuDNN itself needs a GPU (tests/test_kernels_gpu.py); here its op is the torch reference, so this
    checks the slicing, merging and placement of the route on CPU.
    """
    from megatron_apbv.apbv import cudnn_attention
    from megatron_apbv.apbv.attend import _torch_apb_attention

    def reference_op(q, k, v, *, causal, softmax_scale, native_gqa):
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
        mask = mask.tril() if causal else mask
        return masked_attention(q, k, v, mask, softmax_scale=softmax_scale)

    def anchor_kernel(q, kp, vp, ka, va, kb, vb, *, anchor_rows, softmax_scale, out, lse):
        o, s = _torch_apb_attention(q, kp, vp, ka, va, kb, vb, anchor_rows=anchor_rows, softmax_scale=softmax_scale)
        out.copy_(o)
        lse.copy_(s)
        return out, lse

    monkeypatch.setattr(cudnn_attention, "cudnn_attention", reference_op)
    monkeypatch.setattr(cudnn_attention, "cudnn_native_gqa", lambda device, d: True)
    g = torch.Generator().manual_seed(5)
    for ar, n_pass, a, lq in ((6, 5, 6, 11), (0, 7, 3, 9), (0, 0, 4, 9), (0, 0, 0, 8)):
        q = torch.randn(ar + lq, 1, 4, 8, generator=g, dtype=torch.float64)
        kp, vp = (torch.randn(n_pass, 1, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
        ka, va = (torch.randn(a, 1, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
        kb, vb = (torch.randn(lq, 1, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
        out, lse = cudnn_attention.cudnn_block_attention(anchor_kernel, q, kp, vp, ka, va, kb, vb, anchor_rows=ar,
                                                         softmax_scale=0.3)
        ref_out, ref_lse = _torch_apb_attention(q, kp, vp, ka, va, kb, vb, anchor_rows=ar, softmax_scale=0.3)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)  # the torch path computes in fp32
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)


def test_route_table_is_read_from_its_json_and_null_means_triton(hopper_with_cudnn, monkeypatch, tmp_path):
    """The table is data (attention_routes_measured.json, rebuilt by bench_kernels.py); a head dim whose
    measurement found cuDNN slower (``cudnn_from_rows: null``) stays on Triton at every length."""
    import json

    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"9/96": {"tflops": {"32768": {"cudnn": 300.0, "triton": 350.0}},
                                         "cudnn_from_rows": None},
                                "9/80": {"tflops": {"32768": {"cudnn": 450.0, "triton": 351.0}},
                                         "cudnn_from_rows": 32768}}))
    table = attention_routes.load_measured(path)
    assert table[(9, 96)]["tflops"] == {32768: {"cudnn": 300.0, "triton": 350.0}}
    monkeypatch.setattr(attention_routes, "MEASURED", table)
    square = dict(anchor_rows=0, n_pass=3000, n_anchor=2000)
    assert route_for(CUDA, torch.bfloat16, 96, rows=65536, n_block=65536, **square).block_rows == TRITON
    assert route_for(CUDA, torch.bfloat16, 80, rows=32768, n_block=32768, **square).block_rows == CUDNN
    assert route_for(CUDA, torch.bfloat16, 80, rows=16384, n_block=16384, **square).block_rows == TRITON
    committed = attention_routes.load_measured()
    assert committed[(9, 128)]["cudnn_from_rows"] == 32768
