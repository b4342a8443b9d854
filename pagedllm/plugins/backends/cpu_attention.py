"""The CPU attention backend: decodes read the paged cache in place through a small C++ kernel."""

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

    Returns None, with a warning, where no C++ tool chain is available.
    """
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="pagedllm_paged_attention",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, ...: the torch path still works
        logger.warning("pagedllm: CPU attention kernel unavailable (%s); using the torch reference for decodes", exc)
        return None


class CpuAttentionBackend(TorchAttentionBackend):
    """Prefill chunks as the torch backend; decodes through the in-place paged kernel (float32)."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        super().__init__(num_heads, head_dim, num_kv_heads, scale)
        self.kernel = load_kernel()

    def _decode(self, q, key_cache, value_cache, batch: AttentionMetadata) -> torch.Tensor:
        if self.kernel is None or q.dtype != torch.float32 or key_cache.dtype != torch.float32 or q.device.type != "cpu":
            return super()._decode(q, key_cache, value_cache, batch)
        num_decodes = q.shape[0]
        return self.kernel.paged_decode_attention(
            q, key_cache, value_cache, batch.block_tables[:num_decodes], batch.seq_lens[:num_decodes], self.scale
        )
