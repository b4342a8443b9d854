"""Float linear layers on CPU: the weight prepacked once into oneDNN's blocked layout.

``F.linear`` on a CPU float32 tensor runs MKL's sgemm, which re-packs the weight on every
call; at decode batch sizes (tens of rows) that packing is a large part of the work, and on
AMD CPUs MKL does not take its best paths at all. oneDNN (bundled with PyTorch as
``mkldnn``) can pack a weight once for its own matmul kernels; on the model's shapes that
runs 1.2-2x faster from 1 row up to thousands (``benchmarks/dense_linear.py`` measures it
against ``F.linear`` in the same run). Results agree with ``F.linear`` to float32 rounding
(the summation order differs), not bit for bit.

The packed weight keeps the logical ``[out, in]`` shape, dtype and element count, so a
layer can hold it as its ``weight`` parameter; only this module's :func:`linear` reads it.
"""

from __future__ import annotations

import os

import torch

#: Setting ``PAGEDLLM_ONEDNN_LINEAR=0`` keeps float weights as they are (``F.linear``), for A/B runs.
ENV_SWITCH = "PAGEDLLM_ONEDNN_LINEAR"


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (2-D, on CPU) can go to oneDNN: float32, or bfloat16 on a CPU with bf16 instructions."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or weight.dim() != 2 or weight.device.type != "cpu":
        return False
    if weight.is_mkldnn or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` weight in oneDNN's layout (an ``is_mkldnn`` tensor of the same shape and dtype)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a weight from :func:`prepack`; ``x`` is ``[..., in]`` in the weight's dtype.

    A plain contiguous ``[out, in]`` weight works too (oneDNN reorders it on the fly); that is
    still faster than ``F.linear`` here, and is how tiles dequantized per call are multiplied.
    """
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
