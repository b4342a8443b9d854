"""Attention layer: owns its slice of the KV cache and delegates the math to a backend plugin."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.core.attention import AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, backend_cls: type) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.backend = backend_cls(num_heads, head_dim, num_kv_heads, scale)
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the model runner.
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, num_heads * head_dim]; k, v: [num_tokens, num_kv_heads * head_dim]
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, self.kv_cache, batch)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
