"""Float linear layers on CPU: the weight packed once, in the layout of the kernel that multiplies it.

``F.linear`` on a CPU float32 tensor runs MKL's sgemm, which re-packs the weight on every
call; at decode batch sizes (tens of rows) that packing is a large part of the work, and on
AMD CPUs MKL does not take its best paths at all. So weights are packed once, at load:

- float32: into column panels for pagedllm's own kernel (``csrc/dense_gemm.cpp``,
  ``torch.ops.pagedllm_dense``). It streams each panel from memory in the order it is used
  and prefetches the next one while computing, which oneDNN's kernels do not: on a whole
  model's worth of cold weights it runs 1.1-1.4x oneDNN from 1 to 64 rows and about even at
  prefill sizes (``benchmarks/dense_linear.py`` measures the three side by side). Every
  output is one in-order FMA chain over the input features, so a row's result does not
  depend on which other rows share the batch.
- bfloat16 (on CPUs with bf16 instructions), or float32 without a C++ tool chain: oneDNN's
  blocked layout (``mkldnn``, bundled with PyTorch), 1.2-2x ``F.linear``.

Results agree with ``F.linear`` to float32 rounding (the summation order differs), not bit
for bit. Only this module's :func:`linear` reads a packed weight: a oneDNN one keeps the
logical ``[out, in]`` shape; a panel one is ``[panels, in, panel_width]`` and the caller
passes ``out_features``.
"""

from __future__ import annotations

import os

import torch

#: Setting ``PAGEDLLM_ONEDNN_LINEAR=0`` keeps float weights as they are (``F.linear``), for A/B runs.
ENV_SWITCH = "PAGEDLLM_ONEDNN_LINEAR"
#: Setting ``PAGEDLLM_PANEL_LINEAR=0`` packs float32 weights for oneDNN instead of the panel kernel, for A/B runs.
PANEL_SWITCH = "PAGEDLLM_PANEL_LINEAR"


def _panel_ops():
    """``torch.ops.pagedllm_dense``, or None (switched off, or no C++ tool chain)."""
    from pagedllm.core.layers.fused import load_cpu_ops

    if os.environ.get(PANEL_SWITCH, "1") == "0" or not load_cpu_ops():
        return None
    return torch.ops.pagedllm_dense


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (2-D, on CPU) can be packed: float32, or bfloat16 on a CPU with bf16 instructions."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or weight.dim() != 2 or weight.device.type != "cpu":
        return False
    if is_packed(weight):
        return False
    if weight.dtype == torch.float32:
        return _panel_ops() is not None or torch.backends.mkldnn.is_available()
    return weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def is_packed(weight: torch.Tensor) -> bool:
    """Whether ``weight`` came from :func:`prepack`."""
    return weight.is_mkldnn or weight.dim() == 3


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` weight packed for :func:`linear`: panels for float32, else oneDNN's layout."""
    weight = weight.detach().contiguous()
    ops = _panel_ops() if weight.dtype == torch.float32 else None
    if ops is not None:
        return ops.pack(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a weight from :func:`prepack`; ``x`` is ``[..., in]`` in the weight's dtype.

    ``out_features`` is required for a panel-packed weight. A plain contiguous ``[out, in]``
    weight works too (oneDNN reorders it on the fly); that is still faster than ``F.linear``
    here, and is how tiles dequantized per call are multiplied.
    """
    if packed.dim() != 3:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if out_features is None:
        raise ValueError("a panel-packed weight needs out_features")
    if x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1):
        return torch.ops.pagedllm_dense.linear(x, packed, bias, out_features)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    return torch.ops.pagedllm_dense.linear(rows, packed, bias, out_features).view(*x.shape[:-1], out_features)


def can_fuse_silu_and_mul(packed: torch.Tensor, output_sizes: list[int], x: torch.Tensor) -> bool:
    """Whether :func:`linear_silu_and_mul` takes this gate | up weight: panel-packed, two equal
    halves of whole panels, and float32 rows of ``x``."""
    if packed.dim() != 3 or len(output_sizes) != 2 or output_sizes[0] != output_sizes[1]:
        return False
    return output_sizes[0] % packed.shape[2] == 0 and x.dim() == 2 and x.dtype == packed.dtype and (x.stride(1) == 1 or x.shape[1] <= 1)


def linear_silu_and_mul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``silu_and_mul(x @ W.T)`` for a gate | up weight, in one pass: each tile of the gate and up
    products is combined as soon as both are computed, so the ``[rows, out]`` product is never
    stored (bit for bit the separate ops' result). Check :func:`can_fuse_silu_and_mul` first."""
    return torch.ops.pagedllm_dense.linear_silu_mul(x, packed, out_features)


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The plain ``[out, in]`` weight back from :func:`prepack`'s result (for the rare caller that needs it)."""
    if packed.is_mkldnn:
        return packed.to_dense()
    # [panels, in, width] -> [panels, width, in] -> [panels * width, in], less the padding
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:out_features].contiguous()
