"""On a GPU, the APB-V layer runs through the Triton kernels and agrees with the CPU torch path.

Skipped without CUDA. One process, an NCCL group of one: both zigzag blocks,
the passing exchange, the query merge and the kernels are exercised.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("n, a, q, hq, hkv, p", [(5000, 128, 37, 28, 4, 64), (3001, 0, 5, 8, 8, 3), (777, 77, 7, 7, 1, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_on_gpu_matches_cpu_torch_path(group, n, a, q, hq, hkv, p, dtype):
    from megatron_apbv.apbv.attention import apbv_layer_attention
    from megatron_apbv.apbv.kernels_dispatch import kernel_for
    from megatron_apbv.apbv.layout import SequenceLayout

    layout = SequenceLayout(n, a, q, 1, zigzag=True).rank(0)
    g = torch.Generator().manual_seed(n)
    # values exactly representable in the low-precision dtype, so both paths see the same inputs
    Q, K, V = (torch.randn(n, 1, h, 128, generator=g).to(dtype) for h in (hq, hkv, hkv))
    kwargs = dict(passing_len=p, window=5, overlap=True, softmax_scale=128 ** -0.5, group=group)
    assert kernel_for("apb_attention", Q.cuda()) is not None, "CUDA tensors must take the Triton kernels"
    gpu = apbv_layer_attention(Q.cuda(), K.cuda(), V.cuda(), layout, **kwargs).float().cpu()
    cpu = apbv_layer_attention(Q.float(), K.float(), V.float(), layout, **kwargs)
    assert torch.isfinite(gpu).all()
    rel = ((gpu - cpu).norm() / cpu.norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("rows, keys, block", [(1, 70000, 1), (64, 50000, 64), (37, 9100, 0)])
def test_split_keys_path_matches_one_kernel_call(rows, keys, block):
    """Few query rows over many keys take the split-keys path; it must equal one kernel call."""
    from megatron_apbv.apbv.attend import KEY_CHUNK, apb_attention
    from megatron_apbv.apbv.kernels_dispatch import kernel_for

    g = torch.Generator(device="cuda").manual_seed(rows)
    q = torch.randn(rows, 1, 28, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(2, keys, 1, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    kb = torch.randn(2, block, 1, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    anchor = kv[:, :100]
    assert keys >= 2 * KEY_CHUNK  # the dispatch splits these
    split = apb_attention(q, kv[0, 100:], kv[1, 100:], anchor[0], anchor[1], kb[0], kb[1], anchor_rows=0,
                          softmax_scale=128 ** -0.5)
    whole = kernel_for("apb_attention", q)(q, kv[0, 100:], kv[1, 100:], anchor[0], anchor[1], kb[0], kb[1],
                                           anchor_rows=0, softmax_scale=128 ** -0.5)
    assert ((split[0].float() - whole[0].float()).norm() / whole[0].float().norm()).item() < 1e-2
    assert (split[1] - whole[1]).abs().max().item() < 1e-2
