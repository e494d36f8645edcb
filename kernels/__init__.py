"""Triton kernels for APB-V (installed as ``megatron_apbv.kernels``).

The torch implementations in :mod:`megatron_apbv` define the function boundary;
these kernels implement the same functions for CUDA tensors.
"""
