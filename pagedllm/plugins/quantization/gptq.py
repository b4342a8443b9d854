"""GPTQ checkpoints as GPTQModel / AutoGPTQ write them (``quant_method: "gptq"``).

Per linear layer (``in`` inputs, ``out`` outputs, ``G`` groups; bits 2/4/8):

- ``qweight`` int32 ``[in * bits / 32, out]``: packed along the input dim, input row
  ``k * 32 / bits + j`` of column ``o`` at bits ``j * bits`` of word ``[k, o]``;
- ``qzeros`` int32 ``[G, out * bits / 32]``: packed along the output dim the same way. The v1
  format (``checkpoint_format: "gptq"``, the one on disk) stores ``zero - 1``; ``gptq_v2``
  stores the zero itself;
- ``scales`` float16 ``[G, out]``; ``g_idx`` int32 ``[in]``: the group of each input row
  (``i // group_size``, or an unordered map with act-order, ``desc_act``).

``W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]``. Kernels: int4pack for
4-bit (act-order runs with the input columns permuted so groups are contiguous), int8pack for
8-bit per-channel (``group_size: -1``), otherwise the weight dequantized once at load.
"""

from __future__ import annotations

import torch

from pagedllm.core.quantization import LinearMethod, QuantizationMethod, UnquantizedLinearMethod
from pagedllm.plugins.quantization.int_weights import IntLinearMethod, IntWeight, check_kernel_device, unpack

_INT = (torch.int32,)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def decode_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, v1: bool = True) -> IntWeight:  # fmt: skip
    """Checkpoint tensors -> :class:`IntWeight` (codes and zeros transposed to ``[out, in]``)."""
    out = scales.shape[1]
    q = unpack(qweight, bits, dim=0)  # [in, out]
    zero = unpack(qzeros, bits, dim=1)[:, :out]  # [G, out]
    if v1:
        zero = zero + 1  # v1 stored zero - 1 (AutoGPTQ's convention; a zero of 0 wraps to 2**bits)
    if g_idx is None:
        g_idx = torch.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
    return IntWeight(q.t().contiguous(), scales.float().t().contiguous(), zero.float().t().contiguous(), g_idx.long(), bits)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> torch.Tensor:
    """The float32 ``[out, in]`` weight of a GPTQ layer."""
    return decode_gptq(qweight, qzeros, scales, g_idx, bits, v1).dequantize()


class GPTQLinearMethod(IntLinearMethod):
    def expected(self, in_features, rows):
        m = self.method
        groups = 1 if m.group_size <= 0 else -(-in_features // m.group_size)
        return {
            "qweight": ((in_features * m.bits // 32, rows), _INT),
            "qzeros": ((groups, -(-rows * m.bits // 32)), _INT),
            "scales": ((groups, rows), _FLOAT),
            "g_idx": ((in_features,), _INT + (torch.int64,)),
        }

    def decode(self, tensors, in_features, rows):
        m = self.method
        return decode_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], m.bits, m.v1)


class GPTQMethod(QuantizationMethod):
    """GPTQ v1/v2 checkpoints, 2/4/8-bit, any group size, act-order, symmetric or not."""

    name = "gptq"
    kernels = ("int4pack", "int8pack", "triton", "dequant")

    def __init__(self, bits: int = 4, group_size: int = 128, lm_head: bool = False, v1: bool = True) -> None:
        self.bits, self.group_size, self.lm_head, self.v1 = bits, group_size, lm_head, v1

    @classmethod
    def from_config(cls, quant_config, hf_config):
        bits = quant_config.get("bits", 4)
        if bits not in (2, 4, 8):
            raise ValueError(f"quantization_config.bits={bits!r}: quantization method 'gptq' supports 2, 4 and 8 bits")
        group_size = quant_config.get("group_size", 128)
        if not isinstance(group_size, int) or group_size == 0 or group_size < -1:
            raise ValueError(f"quantization_config.group_size={group_size!r}: must be -1 (per channel) or positive")
        fmt = quant_config.get("checkpoint_format") or quant_config.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config.checkpoint_format={fmt!r}: quantization method 'gptq' reads the "
                             "'gptq' (v1) and 'gptq_v2' layouts; convert the checkpoint with GPTQModel")  # fmt: skip
        pack_dtype = quant_config.get("pack_dtype", "int32")
        if pack_dtype != "int32":
            raise ValueError(f"quantization_config.pack_dtype={pack_dtype!r}: only int32 packing is supported")
        if quant_config.get("dynamic"):
            raise ValueError("quantization_config.dynamic: per-module GPTQ overrides are not supported")
        return cls(bits, group_size, bool(quant_config.get("lm_head", False)), fmt == "gptq")

    def check_device(self, device):
        check_kernel_device(self.name, self.kernel, device)

    def get_linear_method(self, prefix: str) -> LinearMethod:
        if prefix == "lm_head" and not self.lm_head:
            return UnquantizedLinearMethod()
        return GPTQLinearMethod(self)
