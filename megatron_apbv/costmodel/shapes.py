"""What a prefill's cost depends on: the model's shape and the GPUs with their interconnect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a decoder depends on. ``attention_only`` drops everything but attention."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2
    batch: int = 1
    attention_only: bool = False

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        m = cfg.model
        return cls(
            layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads, kv_heads=m.num_query_groups,
            head_dim=m.head_dim, ffn=m.ffn_hidden_size, vocab=m.vocab_size, tied_embeddings=m.tie_embeddings,
            dtype_bytes=DTYPE_BYTES[cfg.dtype], batch=cfg.input.batch_size,
        )

    @classmethod
    def attention(cls, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> "ModelShape":
        """One attention call of one layer (the kernel benchmarks and the H200 points)."""
        return cls(1, 0, heads, kv_heads, head_dim, 0, 0, dtype_bytes=dtype_bytes, attention_only=True)

    @property
    def layer_params(self) -> int:
        """Weights of the linear layers of one decoder layer: QKV, output projection, SwiGLU MLP."""
        if self.attention_only:
            return 0
        h, d = self.hidden, self.head_dim
        return h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h + 3 * h * self.ffn

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (self.layer_params + 2 * self.hidden) + self.hidden + embeddings

    def linear_flops(self, tokens: int) -> float:
        """One layer's matmul FLOPs on ``tokens`` local tokens: ``2 * params`` per token."""
        return 2.0 * self.layer_params * tokens * self.batch

    def attention_flops(self, pairs: int, heads: Optional[int] = None) -> float:
        """``4 * d * heads * pairs``: QK^T and PV over the visible (query, key) pairs."""
        return 4.0 * self.head_dim * (self.heads if heads is None else heads) * pairs * self.batch

    @property
    def elementwise_elems(self) -> int:
        """Activation elements per token per layer touched by non-matmul work (one pass).

        Two norms and two residual adds (4H), RoPE on q and k, the attention
        output, SwiGLU (gate, up, out).
        """
        if self.attention_only:
            return 0
        d = self.head_dim
        return 4 * self.hidden + 2 * (self.heads + self.kv_heads) * d + self.heads * d + 3 * self.ffn

    def kv_bytes(self, tokens: int, heads: Optional[int] = None) -> float:
        """K and V of ``tokens`` tokens."""
        return 2.0 * tokens * (self.kv_heads if heads is None else heads) * self.head_dim * self.dtype_bytes * self.batch

    def activation_bytes(self, tokens: int) -> float:
        """Peak live activations of one layer on ``tokens`` tokens (residual, QKV, attention out, MLP)."""
        d = self.head_dim
        elems = 2 * self.hidden + (2 * self.heads + 2 * self.kv_heads) * d + 2 * self.ffn
        return float(elems) * tokens * self.dtype_bytes * self.batch


@dataclass(frozen=True)
class Cluster:
    """``gpus`` GPUs of one kind, ``gpus_per_node`` to a node, joined by one interconnect profile."""

    gpu_name: str
    gpu: dict
    link_name: str
    link: dict
    software: dict
    gpus: int
    gpus_per_node: int = 8

    @property
    def multi_node(self) -> bool:
        return self.gpus > self.gpus_per_node and not self.link.get("single_domain", False)

    def _link(self) -> tuple[float, float, float]:
        """(bytes/s, base latency s, per-hop latency s) of the slowest link the group uses."""
        level = "inter" if self.multi_node else "intra"
        lat = self.link[f"{level}_latency_us"]
        return self.link[f"{level}_gbs"] * 1e9, lat["base"] * 1e-6, lat["hop"] * 1e-6

    # rates ------------------------------------------------------------------------------
    def attention_rate(self, kernel: str) -> float:
        return self.gpu["attention_tflops"][kernel] * 1e12

    @property
    def matmul_rate(self) -> float:
        return self.gpu["matmul_tflops"] * 1e12

    @property
    def mem_bw(self) -> float:
        return self.gpu["mem_bw_gbs"] * 1e9

    @property
    def memory_bytes(self) -> float:
        return self.gpu["memory_gb"] * 1e9

    def method_rate(self, method: str) -> float:
        """Achieved attention rate of ``method``'s kernel (the registry says which kernel it runs)."""
        from megatron_apbv.methods import get_method

        return self.attention_rate(get_method(method).cost_kernel)

    # collectives --------------------------------------------------------------------------
    def allgather_s(self, total_bytes: float) -> float:
        """Ring all-gather whose result holds ``total_bytes``: ``(W-1)/W * S / busbw`` plus latency."""
        w = self.gpus
        if w == 1 or total_bytes <= 0:
            return 0.0
        bw, base, hop = self._link()
        return (w - 1) / w * total_bytes / bw + base + hop * (w - 1)

    def alltoall_s(self, bytes_per_rank: float) -> float:
        """All-to-all where each rank holds ``bytes_per_rank`` and keeps ``1/W`` of it.

        Across nodes, the share bound for other nodes goes over the slow link and
        the share for the own node over NVLink, at the same time.
        """
        w = self.gpus
        if w == 1 or bytes_per_rank <= 0:
            return 0.0
        bw, base, hop = self._link()
        if not self.multi_node:
            return (w - 1) / w * bytes_per_rank / bw + base + hop * (w - 1)
        g = self.gpus_per_node
        intra = (g - 1) / w * bytes_per_rank / (self.link["intra_gbs"] * 1e9)
        inter = (w - g) / w * bytes_per_rank / bw
        return max(intra, inter) + base + hop * (w - 1)

    def p2p_s(self, nbytes: float) -> float:
        """One ring step: every rank sends ``nbytes`` to its successor (full duplex)."""
        if self.gpus == 1 or nbytes <= 0:
            return 0.0
        bw, base, _ = self._link()
        return nbytes / bw + base
