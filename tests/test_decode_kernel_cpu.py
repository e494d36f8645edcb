"""The decode-attention kernel (``kernels/decode_attention.py``) under the Triton interpreter, and its torch twin.

Both are checked against an independent float64 reference (per sequence, per head:
softmax over the visible prefix of the cache, the new tokens causal on the tail)
in fp32 and fp16 (the interpreter's bf16 ``tl.dot`` is wrong), at odd cache
lengths, GQA 1 / 4 / 7, one and several new tokens, and a batch whose sequences
have different lengths. As in test_kernels_cpu.py the interpreted run happens in
a subprocess with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from interpreted_kernels import IN_INTERPRETER, load_interpreted_kernels, rerun_under_interpreter

from megatron_apbv.apbv.decode import decode_attention as torch_decode_attention

# (new tokens, query heads, KV heads, per-sequence lengths, tail flags, capacity)
CASES = [
    (1, 4, 4, [37], [1], 45),  # GQA 1, one token, odd length
    (1, 8, 2, [129, 5, 200], [1, 0, 1], 203),  # GQA 4, batch with different lengths, one non-tail row
    (3, 7, 1, [70, 3], [1, 1], 77),  # GQA 7, three new tokens, causal among themselves
    (2, 8, 2, [0, 66], [0, 1], 70),  # an empty cache row: out 0, lse -inf
]


def reference(q, k, v, lengths, tail, scale):
    """float64 ``(out, lse)``: token j of row b sees keys ``< len_b - tail_b * (t - 1 - j)``."""
    t, b, hq, d = q.shape
    hkv = k.shape[2]
    out = torch.zeros(t, b, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, t), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for j in range(t):
                n = lengths[bi] - tail[bi] * (t - 1 - j)
                if n <= 0:
                    continue
                s = k[:n, bi, h // (hq // hkv)].double() @ q[j, bi, h].double() * scale
                lse[bi, h, j] = torch.logsumexp(s, 0)
                out[j, bi, h] = torch.softmax(s, 0) @ v[:n, bi, h // (hq // hkv)].double()
    return out, lse


def _inputs(case, dtype, seed=0):
    t, hq, hkv, lengths, tail, cap = case
    gen = torch.Generator().manual_seed(seed)
    b, d = len(lengths), 32
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for shape in
               ((t, b, hq, d), (cap, b, hkv, d), (cap, b, hkv, d)))
    k[max(lengths):] = float("nan")  # past every length: must never be read into the result
    v[max(lengths):] = float("nan")
    return q, k, v, torch.tensor(lengths, dtype=torch.int32), torch.tensor(tail, dtype=torch.int32)


def _check(fn, case, dtype, **kw):
    q, k, v, lengths, tail = _inputs(case, dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = fn(q, k, v, lengths, tail, softmax_scale=scale, **kw)
    ref_out, ref_lse = reference(q, k, v, case[3], case[4], scale)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.skipif(IN_INTERPRETER, reason="torch path: checked in the outer run")
@pytest.mark.parametrize("case", CASES)
def test_torch_decode_attention_matches_float64(case):
    _check(torch_decode_attention, case, torch.float32)


def test_decode_kernel_under_interpreter():
    """Outer entry: run the kernel tests of this module in a subprocess with TRITON_INTERPRET=1."""
    proc = rerun_under_interpreter(__file__, "-k", "kernel_")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"{4 * len(CASES)} passed" in proc.stdout, proc.stdout[-2000:]


def _interpreted_kernel():
    return load_interpreted_kernels("_apbv_decode_kernels_interpreted").decode_attention


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs inside the TRITON_INTERPRET=1 subprocess")
@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float16, 3)])
@pytest.mark.parametrize("combine", ["in_kernel", "kernel"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64(case, dtype, splits, combine):
    counters = torch.zeros(len(case[3]) * case[2], dtype=torch.int32)
    _check(_interpreted_kernel(), case, dtype, splits=splits, combine=combine, counters=counters)
    assert not counters.any()  # the in-kernel combine leaves its counters ready for the next call
