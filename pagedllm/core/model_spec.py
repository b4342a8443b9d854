"""What the core hands a model plugin (ModelContext) and what a model declares back (KVCacheSpec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagedllm.core.quantization import QuantizationMethod


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of the KV cache a model needs, declared as data so the core sizes it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        element_size = dtype.itemsize
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element_size


@dataclass
class ModelContext:
    """Engine choices a model needs at construction: never branch on them, pass them down."""

    dtype: torch.dtype
    device: torch.device
    #: Attention backend class (see ``pagedllm_register_attention_backends``).
    attention_backend: type
    max_model_len: int
    #: The model's quantization method (None: float weights); hand it and a prefix to every
    #: Linear / MergedLinear / VocabEmbedding (see ``pagedllm_register_quantization_methods``).
    quant_method: QuantizationMethod | None = None
