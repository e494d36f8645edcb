"""Triton kernels for APB-V (installed as ``megatron_apbv.kernels``).

The torch implementations in :mod:`megatron_apbv` define the function boundary;
these kernels implement the same functions for CUDA tensors.
"""

from .apb_attention import apb_attention
from .decode_attention import decode_attention
from .lse_merge import merge_pair, merge_partials
from .passing_scores import passing_scores, select_passing

__all__ = ["apb_attention", "decode_attention", "merge_pair", "merge_partials", "passing_scores", "select_passing"]
