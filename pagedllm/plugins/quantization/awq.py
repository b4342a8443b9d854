"""AWQ checkpoints in the GEMM layout (AutoAWQ, GPTQModel ``method="awq"``; ``quant_method: "awq"``).

Per linear layer (4-bit, groups of ``group_size`` input rows):

- ``qweight`` int32 ``[in, out / 8]``: packed along the OUTPUT dim in AWQ's interleaved order,
  nibble ``j`` (bits ``4j``) of word ``[i, c]`` holds output column ``8c + [0,2,4,6,1,3,5,7][j]``;
- ``qzeros`` int32 ``[in / group_size, out / 8]``: the same packing; real zeros (no offset);
- ``scales`` float16/bfloat16 ``[in / group_size, out]``.

``W[o, i] = (q[i, o] - zero[i // g, o]) * scales[i // g, o]``; kernel: int4pack (group sizes
32-256), else the weight dequantized at load.
"""

from __future__ import annotations

import torch

from pagedllm.core.quantization import LinearMethod, QuantizationMethod, UnquantizedLinearMethod
from pagedllm.plugins.quantization.int_weights import IntLinearMethod, IntWeight, check_kernel_device, plain_g_idx, unpack

# Natural column 8c + k is nibble AWQ_UNDO_ORDER[k] of word c (the inverse of [0, 2, 4, 6, 1, 3, 5, 7]).
AWQ_UNDO_ORDER = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[rows, cols / 8]`` in AWQ order -> 4-bit values ``[rows, cols]`` in natural order."""
    nibbles = unpack(packed, 4, dim=1).view(packed.shape[0], -1, 8)
    return nibbles[..., AWQ_UNDO_ORDER].reshape(packed.shape[0], -1)


def decode_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> IntWeight:
    q = unpack_awq(qweight)  # [in, out]
    zero = unpack_awq(qzeros)  # [G, out]
    return IntWeight(q.t().contiguous(), scales.float().t().contiguous(), zero.float().t().contiguous(),
                     plain_g_idx(q.shape[0], group_size), 4)  # fmt: skip


def dequantize_awq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """The float32 ``[out, in]`` weight of an AWQ GEMM layer."""
    return decode_awq(qweight, qzeros, scales, group_size).dequantize()


class AWQLinearMethod(IntLinearMethod):
    def expected(self, in_features, rows):
        groups = 1 if self.method.group_size <= 0 else in_features // self.method.group_size
        floats = (torch.float16, torch.bfloat16, torch.float32)
        return {
            "qweight": ((in_features, rows // 8), (torch.int32,)),
            "qzeros": ((groups, rows // 8), (torch.int32,)),
            "scales": ((groups, rows), floats),
        }

    def decode(self, tensors, in_features, rows):
        return decode_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], self.method.group_size)


class AWQMethod(QuantizationMethod):
    """AWQ GEMM checkpoints: 4-bit with zero points."""

    name = "awq"
    kernels = ("int4pack", "triton", "dequant")

    def __init__(self, group_size: int = 128, skip: tuple[str, ...] = ()) -> None:
        self.group_size, self.skip = group_size, skip

    @classmethod
    def from_config(cls, quant_config, hf_config):
        bits = quant_config.get("bits", quant_config.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"quantization_config.bits={bits!r}: quantization method 'awq' supports 4 bits")
        version = str(quant_config.get("version", quant_config.get("format", "gemm"))).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version={version!r}: quantization method 'awq' reads the 'gemm' "
                             "layout (GEMV / Marlin layouts differ); re-save the model in GEMM format")  # fmt: skip
        if not quant_config.get("zero_point", True):
            raise ValueError("quantization_config.zero_point=false: only AWQ with zero points is supported")
        group_size = quant_config.get("group_size", quant_config.get("q_group_size", 128))
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
            raise ValueError(f"quantization_config.group_size={group_size!r}: must be a positive multiple of 8")
        return cls(group_size, tuple(quant_config.get("modules_to_not_convert") or ()))

    def check_device(self, device):
        check_kernel_device(self.name, self.kernel, device)

    def get_linear_method(self, prefix: str) -> LinearMethod:
        if prefix == "lm_head" or any(name in prefix for name in self.skip):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self)
