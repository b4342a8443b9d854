"""Float weight layout for CPU matmuls: weights kept column-major so MKL's sgemm takes its fast path.

``F.linear(x, W)`` with W stored row-major ([out, in] contiguous, as checkpoints hold it)
runs MKL's "NT" sgemm, which re-packs the transposed weight on every call; at decode batch
sizes (tens of rows) that packing is a large part of the work. Stored column-major
(``[in, out]`` contiguous, viewed as [out, in]), the same ``F.linear`` call runs the "NN"
kernel: 1.2-1.7x faster for 16-256 rows and the same speed for thousands, with bit-identical
results from 8 rows up (``benchmarks/dense_linear.py`` measures it on the model's shapes).
"""

from __future__ import annotations

import torch


def to_column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same ``[out, in]`` values, stored transposed (``[in, out]`` contiguous); a view callers use as before."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    return weight.t().contiguous().t()


def is_column_major(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]
