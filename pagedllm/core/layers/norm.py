"""RMSNorm, computed in float32 like the reference implementations, optionally fused with the residual add."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.core.layers.fused import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``: ``(norm(residual + x), residual + x)`` in one pass.

        The fused form may overwrite ``x`` and ``residual`` (it reuses their memory).
        """
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)
