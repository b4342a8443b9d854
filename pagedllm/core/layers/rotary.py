"""Rotary position embeddings, with the scaling variants Hugging Face configs declare."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.core.layers.fused import rotary_


def _inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, using transformers' own RoPE formulas."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", "dynamic"):
        # "dynamic" (NTK) only departs from default past the original context length,
        # which max_model_len never exceeds.
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        return inv_freq.float(), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """Applies RoPE in the "rotate half" layout Hugging Face Llama uses.

    One instance can serve every layer: the cos/sin rows of a step's positions are looked
    up once and reused while the same positions tensor comes back.
    """

    def __init__(self, hf_config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = _inv_freq(hf_config, head_dim)
        # [max_positions, head_dim // 2]
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cached
        if cached is None or cached[0] is not positions or cached[1].dtype != dtype:
            # [num_tokens, 1, head_dim // 2]
            cached = (positions, self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype))
            self._cached = cached
        return cached[1], cached[2]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [num_tokens, heads, head_dim]: pass queries and keys together as one tensor."""
        cos, sin = self._lookup(positions, x.dtype)
        return _rotate(x, cos, sin)

    def rotate_(self, positions: torch.Tensor, x: torch.Tensor, num_heads: int) -> None:
        """Rotate, in place, heads ``[0, num_heads)`` of each row of ``x`` [num_tokens, width]
        (e.g. the query and key heads at the start of a fused qkv row)."""
        rotary_(x, num_heads, positions, self.cos, self.sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
