"""Attention layer: owns its slice of the KV cache (and its fp8 scales) and delegates the math to a backend plugin."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.core.attention import AttentionMetadata

#: The fp8 cache dtypes: the cache holds k / k_scale and v / v_scale, saturated.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: Scales computed on the fly map this many times the first batch's largest |k| (|v|) to
#: the format's largest value: later, larger values still fit, and small ones keep their
#: precision (fp8's normal range spans ~2^15 in e4m3).
KV_SCALE_HEADROOM = 4.0
#: Checkpoint tensor names of the per-tensor scales (compressed-tensors / vLLM FP8
#: checkpoints; ``kv_scale`` is the older single-scale name).
KV_SCALE_NAMES = ("k_scale", "v_scale", "kv_scale")


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, backend_cls: type) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.backend = backend_cls(num_heads, head_dim, num_kv_heads, scale)
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the model runner.
        self.kv_cache: torch.Tensor | None = None
        #: float32 [2]: (k_scale, v_scale) of an fp8 cache; from the checkpoint, else computed
        #: from the first batch this layer sees.
        self.register_buffer("kv_scales", torch.ones(2, dtype=torch.float32), persistent=False)
        self.kv_scales_known = False

    def load_kv_scale(self, name: str, tensor: torch.Tensor) -> None:
        """Take a checkpoint scale (``k_scale``, ``v_scale`` or ``kv_scale`` for both)."""
        if name not in KV_SCALE_NAMES or tensor.numel() != 1:
            raise ValueError(f"KV-cache scale {name!r} must be one of {KV_SCALE_NAMES} and hold one value, got shape {tuple(tensor.shape)}")
        value = float(tensor.float().item())
        if not value > 0:
            raise ValueError(f"KV-cache scale {name} must be positive, got {value}")
        if name != "v_scale":
            self.kv_scales[0] = value
        if name != "k_scale":
            self.kv_scales[1] = value
        self.kv_scales_known = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, num_heads * head_dim]; k, v: [num_tokens, num_kv_heads * head_dim]
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.kv_cache.dtype in FP8_DTYPES:
            if not self.kv_scales_known:
                self._compute_kv_scales(k, v)
            out = self.backend.forward(q, k, v, self.kv_cache, batch, kv_scales=self.kv_scales)
        else:
            out = self.backend.forward(q, k, v, self.kv_cache, batch)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _compute_kv_scales(self, k: torch.Tensor, v: torch.Tensor) -> None:
        fp8_max = torch.finfo(self.kv_cache.dtype).max
        amax = torch.stack([k.abs().amax(), v.abs().amax()]).float()
        self.kv_scales.copy_((amax * (KV_SCALE_HEADROOM / fp8_max)).clamp_min(1e-8))
        self.kv_scales_known = True
