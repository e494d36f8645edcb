"""megatron-apbv: APB-V sequence-parallel approximate attention for Megatron-core inference."""

__version__ = "0.1.0"
