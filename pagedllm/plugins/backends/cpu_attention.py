"""The CPU attention backend: one C++ call per layer writes the new keys and values and
attends every request of the step (decodes and prefill chunks) over the paged cache in place."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from pagedllm.core.attention import AttentionMetadata
from pagedllm.plugins.backends.torch_attention import TorchAttentionBackend

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"


@functools.cache
def load_kernel():
    """Compile (once per machine; cached by torch under ~/.cache/torch_extensions) and load the kernel.

    Returns the op namespace (``.paged_attention``), or None, with a warning, where no
    C++ tool chain is available.
    """
    try:
        from torch.utils.cpp_extension import load

        load(
            name="pagedllm_paged_attention_v5",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.pagedllm_attention
    except Exception as exc:  # no compiler, no ninja, ...: the torch path still works
        logger.warning("pagedllm: CPU attention kernel unavailable (%s); using the torch reference backend", exc)
        return None


class CpuAttentionBackend(TorchAttentionBackend):
    """Paged attention in C++ (float32, bfloat16, float16 or fp8 cache; float32 compute).

    Its cache tiles one (block, kv head) contiguously, keys transposed (see the kernel
    source), so the kernel's inner loops are contiguous AXPYs. Without a C++ tool chain it
    is the torch backend, layout included.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        super().__init__(num_heads, head_dim, num_kv_heads, scale)
        self.kernel = load_kernel()
        # One torch op a layer, reading the step from tensors: a traced decode step records it
        # (without the kernel, the torch backend's loops read Python lists: no graphs).
        self.supports_decode_graphs = self.kernel is not None
        self._unit_scales = torch.ones(2, dtype=torch.float32)  # the kernel reads scales only for an fp8 cache

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        if self.kernel is None:
            return super().kv_cache_shape(num_blocks, block_size)
        return (2, num_blocks, self.num_kv_heads, block_size * self.head_dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionMetadata,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.kernel is None:
            return super().forward(q, k, v, kv_cache, batch, kv_scales)
        if q.device.type != "cpu":
            raise ValueError(f"the 'cpu' attention backend runs on CPU tensors, got {q.device}; use attention_backend='torch'")
        scales = self._unit_scales if kv_scales is None else kv_scales
        return self.kernel.paged_attention(
            q, k, v, kv_cache, scales, batch.slot_mapping, batch.block_tables, batch.seq_lens, batch.query_start_loc,
            batch.num_decodes, batch.block_size, self.scale,
        )
