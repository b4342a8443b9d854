"""GGUF block formats in torch: dequantize raw blocks, and read 4-bit types as (q, scale, zero) groups of 32.

Ported from gguf-py's ``gguf.quants`` (the format's own library, which the tests compare
against); the arithmetic keeps its order so results are bit-identical. Raw tensors are
``[rows, bytes_per_row]`` uint8; every function works on any device.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGML = GGMLQuantizationType


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16 * k] bytes -> [n, 32 * k]: per 16 bytes, their low nibbles, then their high nibbles."""
    qs = qs.reshape(qs.shape[0], -1, 1, 16)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 32 fifth bits (a little-endian uint32 per block) -> [n, 32] of 0/1, shifted to bit 4."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return (((qh.unsqueeze(-1) >> shifts) & 1) << 4).reshape(qh.shape[0], 32)


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins per 256-value block."""
    d, m, md = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _k_sub_blocks(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the scale and the min of each 32-value sub-block, [n, 8, 1] each (w = scale * q - min)."""
    sc, mn = _k_scale_min(b[:, 4:16])
    return (_f16(b, 0) * sc).unsqueeze(-1), (_f16(b, 2) * mn).unsqueeze(-1)


def _q4_k_values(b: torch.Tensor) -> torch.Tensor:
    """Q4_K's 4-bit values [n, 8, 32]: each 32-byte chunk holds two sub-blocks (low, then high nibbles)."""
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(b):
    scale, minimum = _k_sub_blocks(b)
    return (scale * _q4_k_values(b).float() - minimum).reshape(-1, 256)


def _q5_k(b):
    scale, minimum = _k_sub_blocks(b)
    qs = b[:, 48:].reshape(-1, 4, 1, 32)
    low = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1
    return (scale * (low | (high << 4)).float() - minimum).reshape(-1, 256)


def _q6_k(b):
    ql, qh = b[:, :128].reshape(-1, 2, 1, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh >> shifts) & 3).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return ((_f16(b, 208) * scales).unsqueeze(-1) * q).reshape(-1, 256)


DEQUANTIZERS = {
    GGML.Q4_0: _q4_0, GGML.Q4_1: _q4_1, GGML.Q5_0: _q5_0, GGML.Q5_1: _q5_1, GGML.Q8_0: _q8_0,
    GGML.Q4_K: _q4_k, GGML.Q5_K: _q5_k, GGML.Q6_K: _q6_k,
}  # fmt: skip


def dequantize(raw: torch.Tensor, qtype: GGML) -> torch.Tensor:
    """Raw blocks [rows, bytes_per_row] uint8 -> float32 [rows, values_per_row]."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    return DEQUANTIZERS[qtype](raw.reshape(-1, type_size)).reshape(raw.shape[0], -1)


def int4_groups(raw: torch.Tensor, qtype: GGML) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K as ``w = (q - 8) * scale + zero`` per 32 values: (q uint8 [rows, in], scale, zero [rows, in / 32]).

    That is torch's int4pack convention: Q4_0 ``d * (q - 8)`` has zero 0; Q4_1 ``d * q + m``
    has zero ``m + 8 d``; Q4_K ``s * q - m`` (per sub-block) has zero ``8 s - m``.
    """
    rows = raw.shape[0]
    b = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    if qtype == GGML.Q4_0:
        q, scale, zero = _nibbles(b[:, 2:]), _f16(b, 0), torch.zeros_like(_f16(b, 0))
    elif qtype == GGML.Q4_1:
        q, scale = _nibbles(b[:, 4:]), _f16(b, 0)
        zero = _f16(b, 2) + 8 * scale
    elif qtype == GGML.Q4_K:
        q, (scale, minimum) = _q4_k_values(b), _k_sub_blocks(b)
        zero = 8 * scale - minimum
    else:
        raise ValueError(f"GGUF type {qtype.name} is not a 4-bit type with groups of 32")
    return q.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)
