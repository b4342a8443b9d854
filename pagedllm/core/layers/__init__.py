"""Shared building blocks for model plugins: linear layers, norms, rotary embeddings, attention."""

from pagedllm.core.layers.attention import Attention
from pagedllm.core.layers.linear import Linear, MergedLinear, VocabEmbedding
from pagedllm.core.layers.norm import RMSNorm
from pagedllm.core.layers.rotary import RotaryEmbedding

__all__ = ["Attention", "Linear", "MergedLinear", "RMSNorm", "RotaryEmbedding", "VocabEmbedding"]
